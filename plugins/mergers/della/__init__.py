"""DELLA-Merging (Deep et al., arXiv:2406.11617): magnitude-ranked random pruning (MAGPRUNE), then TIES election."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "della",
        "mergeplug_plugins.mergers.della.merger:DellaMerger",
        description="Drop task-vector entries with magnitude-ranked probabilities per row, rescale, then TIES election.",
        reference="arXiv:2406.11617",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
