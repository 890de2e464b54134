"""Localize-and-Stitch with trained masks (He et al., arXiv:2408.13656): learn each model's sparse mask on a few
samples of its own domain, then stitch the masked task vectors, averaging where masks overlap."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "localize_stitch_trained",
        "mergeplug_plugins.mergers.localize_stitch_trained.merger:TrainedLocalizeAndStitch",
        description="Learn a sparse mask of each model's task vector on its own data; average the masked "
                    "entries where masks overlap.",
        reference="arXiv:2408.13656",
        parameters=HERE / "parameters.json",
        needs_base=True,
    )
