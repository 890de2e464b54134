"""Multi-model SLERP: the weighted spherical average of Buss & Fillmore (https://doi.org/10.1145/502122.502124)."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "multislerp",
        "mergeplug_plugins.mergers.multislerp.merger:MultiSlerp",
        description="Weighted spherical average of N models (or task vectors); slerp when N = 2.",
        reference="https://doi.org/10.1145/502122.502124",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=False,
    )
