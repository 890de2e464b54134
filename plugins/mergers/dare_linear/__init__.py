"""DARE (Yu et al., arXiv:2311.03099): drop task-vector entries at random, rescale the rest, add them up."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "dare_linear",
        "mergeplug_plugins.mergers.dare_linear.merger:DareLinearMerger",
        description="Randomly drop task-vector entries, rescale the kept ones by 1/density, then task arithmetic.",
        reference="arXiv:2311.03099",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
