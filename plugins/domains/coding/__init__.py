"""Coding, a MergeBench domain (arXiv:2505.10833): HumanEval+ and MBPP+. The domain is data: domain.yaml."""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "coding",
        Path(__file__).with_name("domain.yaml"),
        description="Python code generation: HumanEval+ and MBPP+, pass@1 and pass@10 (MergeBench).",
        reference="arXiv:2505.10833",
    )
