"""Refusing harm to the living, helping with look-alike chores, scored by the safety evaluator: a domain of
the tiny world.

The domain is data: domain.yaml, and the JSONL files generate.py writes beside it (python -m
mergeplug_plugins.domains.tiny_refusal.generate).
"""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "tiny_refusal",
        Path(__file__).with_name("domain.yaml"),
        description="Tiny world: refusing harm to living targets, helping with look-alikes, scored by safety.",
        reference="arXiv:2308.01263",
    )
