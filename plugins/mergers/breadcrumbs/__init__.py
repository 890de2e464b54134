"""Model Breadcrumbs (Davari & Belilovsky, arXiv:2312.06795): drop task-vector outliers and tiny entries."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "breadcrumbs",
        "mergeplug_plugins.mergers.breadcrumbs.merger:BreadcrumbsMerger",
        description="Mask each task vector's largest (outliers) and smallest entries per tensor, then task arithmetic.",
        reference="arXiv:2312.06795",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
