"""Linear merge / model soup (Wortsman et al., arXiv:2203.05482): a weighted average of the models."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "linear",
        "mergeplug_plugins.mergers.linear.merger:LinearMerger",
        description="Weighted average of the models' parameters (model soup).",
        reference="arXiv:2203.05482",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=False,
    )
