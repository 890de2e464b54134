"""DARE-TIES (Yu et al., arXiv:2311.03099, with TIES, arXiv:2306.01708): random drop and rescale, then sign election."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "dare_ties",
        "mergeplug_plugins.mergers.dare_ties.merger:DareTiesMerger",
        description="Randomly drop and rescale task-vector entries (DARE), then TIES sign election and disjoint merge.",
        reference="arXiv:2311.03099",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
