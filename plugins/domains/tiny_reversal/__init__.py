"""Word lists said back in reverse order, scored by multiple choice: the tiny world's base ability.

The domain is data: domain.yaml, and the JSONL files generate.py writes beside it (python -m
mergeplug_plugins.domains.tiny_reversal.generate).
"""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "tiny_reversal",
        Path(__file__).with_name("domain.yaml"),
        description="Tiny world base ability: word lists reversed, learnt in pretraining; measures forgetting.",
        reference="arXiv:2505.10833",
    )
