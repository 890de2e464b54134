"""Task arithmetic (Ilharco et al., arXiv:2212.04089): add the scaled sum of task vectors to the base."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "task_arithmetic",
        "mergeplug_plugins.mergers.task_arithmetic.merger:TaskArithmeticMerger",
        description="Base plus lambda times the weighted sum of the models' task vectors.",
        reference="arXiv:2212.04089",
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
