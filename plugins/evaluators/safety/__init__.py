"""Safety: refusal rate on harmful prompts and compliance rate on benign ones (XSTest, arXiv:2308.01263)."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_evaluators(register):
    register(
        "safety",
        "mergeplug_plugins.evaluators.safety.evaluator:Safety",
        description="Refusal rate on harmful prompts, compliance rate on benign ones, as labelled by a judge.",
        reference="arXiv:2308.01263",
        parameters=HERE / "parameters.json",
    )
