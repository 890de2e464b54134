"""Multiple choice by log-likelihood: acc and length-normalised acc_norm, as lm-eval-harness (arXiv:2405.14782)."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_evaluators(register):
    register(
        "multiple_choice",
        "mergeplug_plugins.evaluators.multiple_choice.evaluator:MultipleChoice",
        description="Pick the choice the model finds most likely (acc) and per unit of length (acc_norm).",
        parameters=HERE / "parameters.json",
        reference="arXiv:2405.14782",
    )
