"""Exact token alignment: source and pivot share one vocabulary, so each token maps to itself (by string)."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_aligners(register):
    register(
        "exact",
        "mergeplug_plugins.aligners.exact.aligner:ExactAligner",
        description="Same vocabulary: each source token maps to the pivot token with the identical string.",
        reference="arXiv:2402.16107",
        parameters=HERE / "parameters.json",
        needs_corpus=False,
    )
