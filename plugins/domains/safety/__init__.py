"""Safety, a MergeBench domain (arXiv:2505.10833): XSTest, WildGuardTest, HarmBench. The domain is data: domain.yaml."""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "safety",
        Path(__file__).with_name("domain.yaml"),
        description="Refusing harmful requests, answering benign ones: XSTest, WildGuardTest, HarmBench (MergeBench).",
        reference="arXiv:2505.10833",
    )
