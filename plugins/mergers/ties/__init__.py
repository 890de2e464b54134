"""TIES-Merging (Yadav et al., arXiv:2306.01708): trim task vectors, elect signs, merge the agreeing entries."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "ties",
        "mergeplug_plugins.mergers.ties.merger:TiesMerger",
        description="Trim task vectors to their largest entries, elect a sign per parameter, average the agreeing ones.",
        reference="arXiv:2306.01708",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
