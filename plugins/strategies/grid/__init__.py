"""Grid search: every combination of the space's values, in declared order (arXiv:2212.04089 picks λ this way)."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_strategies(register):
    register(
        "grid",
        "mergeplug_plugins.strategies.grid.strategy:GridSearch",
        description="Every combination of the listed values (Cartesian product, declared order).",
        reference="arXiv:2212.04089",
        parameters=HERE / "parameters.json",
    )
