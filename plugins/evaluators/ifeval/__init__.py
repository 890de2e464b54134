"""IFEval (Zhou et al., arXiv:2311.07911): verifiable instructions, prompt- and instruction-level accuracy."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_evaluators(register):
    register(
        "ifeval",
        "mergeplug_plugins.evaluators.ifeval.evaluator:IFEval",
        description="Verifiable instructions: prompt/instruction-level accuracy, strict and loose (IFEval).",
        reference="arXiv:2311.07911",
        parameters=HERE / "parameters.json",
    )
