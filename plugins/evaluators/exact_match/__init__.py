"""Exact match of an extracted final answer: GSM8K (arXiv:2110.14168) and MATH (arXiv:2103.03874) style."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_evaluators(register):
    register(
        "exact_match",
        "mergeplug_plugins.evaluators.exact_match.evaluator:ExactMatch",
        description="Exact match of the final answer extracted from a generation (GSM8K, MATH).",
        parameters=HERE / "parameters.json",
        reference="arXiv:2110.14168",
    )
