"""Model Breadcrumbs masks (arXiv:2312.06795) with TIES sign election (arXiv:2306.01708)."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "breadcrumbs_ties",
        "mergeplug_plugins.mergers.breadcrumbs_ties.merger:BreadcrumbsTiesMerger",
        description="Mask each task vector's outliers and smallest entries per tensor, then TIES sign election.",
        reference="arXiv:2312.06795",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
