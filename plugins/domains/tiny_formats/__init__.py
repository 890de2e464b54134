"""Answers under verifiable format constraints scored by IFEval's checkers: a domain of the tiny world.

The domain is data: domain.yaml, and the JSONL files generate.py writes beside it (python -m
mergeplug_plugins.domains.tiny_formats.generate).
"""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "tiny_formats",
        Path(__file__).with_name("domain.yaml"),
        description="Tiny world: short answers under verifiable format constraints, scored by IFEval.",
        reference="arXiv:2311.07911",
    )
