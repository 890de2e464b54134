"""Phrases translated into two made-up languages, scored by multiple choice: a domain of the tiny world.

The domain is data: domain.yaml, and the JSONL files generate.py writes beside it (python -m
mergeplug_plugins.domains.tiny_translation.generate).
"""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "tiny_translation",
        Path(__file__).with_name("domain.yaml"),
        description="Tiny world: phrase translation with two made-up languages, scored by multiple choice.",
        reference="arXiv:2405.14782",
    )
