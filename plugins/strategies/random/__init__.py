"""Random search: seeded independent draws from lists and ranges (Bergstra and Bengio, JMLR 13, 2012)."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_strategies(register):
    register(
        "random",
        "mergeplug_plugins.strategies.random.strategy:RandomSearch",
        description="Seeded draws: uniform over lists and ranges, log-uniform with log: true; needs trials.",
        reference="https://jmlr.org/papers/v13/bergstra12a.html",
        parameters=HERE / "parameters.json",
    )
