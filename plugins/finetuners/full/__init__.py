"""Full finetuning (MergeBench's specialists, arXiv:2505.10833): every weight trained. Registration only."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_finetuners(register):
    register(
        "full",
        "mergeplug_plugins.finetuners.full.finetuner:FullFinetuner",
        description="Supervised finetuning of every weight, MergeBench's recipe by default.",
        reference="arXiv:2505.10833",
        parameters=HERE / "parameters.json",
    )
