"""Mined token alignment (FuseLLM, arXiv:2401.10491): each source token to the pivot token at minimum edit distance."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_aligners(register):
    register(
        "mined",
        "mergeplug_plugins.aligners.mined.aligner:MinedAligner",
        description="Each source token to the pivot token of minimum edit distance (FuseLLM's MinED mapping).",
        reference="arXiv:2401.10491",
        parameters=HERE / "parameters.json",
        needs_corpus=False,
    )
