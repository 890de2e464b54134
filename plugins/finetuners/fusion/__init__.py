"""Pairwise knowledge-fusion finetuning (FuseChat, arXiv:2402.16107): the pivot trained on the gold tokens and
towards one source's fused top-k distributions. Registration only."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_finetuners(register):
    register(
        "fusion",
        "mergeplug_plugins.finetuners.fusion.finetuner:FusionFinetuner",
        description="λ·LM loss + (1-λ)·cross-entropy towards fused top-k target distributions (run by `mergeplug fuse`).",
        reference="arXiv:2402.16107",
        parameters=HERE / "parameters.json",
    )
