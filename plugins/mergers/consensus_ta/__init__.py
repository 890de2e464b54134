"""Consensus Task Arithmetic (Wang et al., arXiv:2405.07813): task arithmetic kept to the weights that at least
k tasks use, found with per-task TALL masks."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "consensus_ta",
        "mergeplug_plugins.mergers.consensus_ta.merger:ConsensusTaskArithmetic",
        description="Task arithmetic restricted to weights that at least k tasks' TALL masks select.",
        reference="arXiv:2405.07813",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
