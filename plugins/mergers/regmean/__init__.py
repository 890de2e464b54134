"""RegMean (Jin et al., arXiv:2212.09849): per linear layer, the weights that best match every model's outputs on its own data."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "regmean",
        "mergeplug_plugins.mergers.regmean.merger:RegMeanMerger",
        description="Per linear layer, least-squares weights matching each model's outputs on its own data; rest averaged.",
        reference="arXiv:2212.09849",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=False,
    )
