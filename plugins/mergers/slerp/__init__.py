"""Spherical linear interpolation (Shoemake 1985, https://doi.org/10.1145/325165.325242) between two models."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "slerp",
        "mergeplug_plugins.mergers.slerp.merger:Slerp",
        description="Spherical interpolation between two endpoints: base_model and one model, or two models.",
        reference="https://doi.org/10.1145/325165.325242",
        parameters=HERE / "parameters.json",
        needs_base=False,
    )
