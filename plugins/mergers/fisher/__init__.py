"""Fisher merging (Matena & Raffel, arXiv:2111.09832): a mean of the models weighted by each one's diagonal Fisher."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "fisher",
        "mergeplug_plugins.mergers.fisher.merger:FisherMerger",
        description="Average of the models weighted per parameter by each model's diagonal Fisher on its own data.",
        reference="arXiv:2111.09832",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=False,
    )
