"""SCE merging (Wan et al., FuseChat, arXiv:2408.07990): Select high-variance positions, Calculate per-model
weights, Erase minority signs."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "sce",
        "mergeplug_plugins.mergers.sce.merger:SCE",
        description="Select high-variance positions, weight models by update energy, erase minority signs.",
        reference="arXiv:2408.07990",
        parameters=HERE / "parameters.json",
        needs_base=True,
    )
