"""Mathematics, a MergeBench domain (arXiv:2505.10833): GSM8K and MATH. The domain is data: domain.yaml."""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "math",
        Path(__file__).with_name("domain.yaml"),
        description="Mathematical reasoning: GSM8K 8-shot CoT and MATH-500 (MergeBench).",
        reference="arXiv:2505.10833",
    )
