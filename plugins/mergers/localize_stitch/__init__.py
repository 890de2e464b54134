"""Localize-and-Stitch, dataless form (He et al., arXiv:2408.13656): keep each model's largest task-vector
entries and average them where they overlap."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "localize_stitch",
        "mergeplug_plugins.mergers.localize_stitch.merger:LocalizeAndStitch",
        description="Keep each model's top-magnitude task-vector entries; average them where masks overlap.",
        reference="arXiv:2408.13656",
        parameters=HERE / "parameters.json",
        needs_base=True,
    )
