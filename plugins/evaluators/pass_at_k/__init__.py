"""pass@k of generated code run against its tests in a sandbox (Codex estimator, arXiv:2107.03374)."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_evaluators(register):
    register(
        "pass_at_k",
        "mergeplug_plugins.evaluators.pass_at_k.evaluator:PassAtK",
        description="Run sampled programs with their tests in a best-effort sandbox; unbiased pass@k.",
        parameters=HERE / "parameters.json",
        reference="arXiv:2107.03374",
    )
