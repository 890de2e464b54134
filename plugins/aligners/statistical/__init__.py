"""Statistical token alignment (FuseChat, arXiv:2402.16107): the pivot token each source token is most often aligned with."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_aligners(register):
    register(
        "statistical",
        "mergeplug_plugins.aligners.statistical.aligner:StatisticalAligner",
        description="Each source token to the pivot token it is most often aligned with over a corpus (FuseChat).",
        reference="arXiv:2402.16107",
        parameters=HERE / "parameters.json",
        needs_corpus=True,
    )
