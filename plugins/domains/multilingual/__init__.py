"""Multilingual understanding, a MergeBench domain (arXiv:2505.10833): m_MMLU, m_ARC, m_HellaSwag in fr, es, de, ru.

The domain is data: domain.yaml.
"""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "multilingual",
        Path(__file__).with_name("domain.yaml"),
        description="Multiple choice in fr, es, de, ru: m_MMLU, m_ARC, m_HellaSwag (MergeBench).",
        reference="arXiv:2505.10833",
    )
