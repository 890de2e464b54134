"""Model Stock (Jang et al., arXiv:2403.19522): move from the base toward the models' average by a ratio set by
the angle between their task vectors."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "model_stock",
        "mergeplug_plugins.mergers.model_stock.merger:ModelStock",
        description="Interpolate base and model average by a ratio set by the angle between task vectors.",
        reference="arXiv:2403.19522",
        parameters=HERE / "parameters.json",
        needs_base=True,
    )
