"""Base abilities outside MergeBench's five domains, for forgetting (arXiv:2505.10833): MMLU and TriviaQA.

The domain is data: domain.yaml.
"""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "general",
        Path(__file__).with_name("domain.yaml"),
        description="Base abilities for forgetting: MMLU and TriviaQA (role base_ability).",
        reference="arXiv:2505.10833",
    )
