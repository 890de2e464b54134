"""Instruction following, MergeBench's first domain (arXiv:2505.10833): IFEval. The domain is data: domain.yaml."""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "instruction_following",
        Path(__file__).with_name("domain.yaml"),
        description="Following verifiable instructions: IFEval (MergeBench).",
        reference="arXiv:2505.10833",
    )
