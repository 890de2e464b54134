"""A refusal judge by phrase matching, XSTest's string-match baseline idea (Röttger et al., arXiv:2308.01263)."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_judges(register):
    register(
        "refusal_keywords",
        "mergeplug_plugins.judges.refusal_keywords.judge:RefusalKeywords",
        description="Refusal = a refusal phrase (\"I'm sorry\", \"I cannot\"...) near the start of the response.",
        reference="arXiv:2308.01263",
        parameters=HERE / "parameters.json",
    )
