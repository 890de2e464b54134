"""VaRM, Variation Ratio Merge (Wan et al., FusionChat, arXiv:2402.16107): weight each model, per parameter
matrix, by the mean squared size of its update."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "varm",
        "mergeplug_plugins.mergers.varm.merger:VaRM",
        description="Per-matrix weights proportional to each model's mean squared update (variation ratio).",
        reference="arXiv:2402.16107",
        parameters=HERE / "parameters.json",
        needs_base=True,
    )
