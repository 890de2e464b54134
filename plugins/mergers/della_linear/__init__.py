"""DELLA's MAGPRUNE (Deep et al., arXiv:2406.11617) followed by task arithmetic, without sign election."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "della_linear",
        "mergeplug_plugins.mergers.della_linear.merger:DellaLinearMerger",
        description="Drop task-vector entries with magnitude-ranked probabilities per row, rescale, then task arithmetic.",
        reference="arXiv:2406.11617",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
