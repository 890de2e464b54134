"""Two-number word problems scored by exact match: a domain of the tiny world (`mergeplug bench tiny`).

The domain is data: domain.yaml, and the JSONL files generate.py writes beside it (python -m
mergeplug_plugins.domains.tiny_arithmetic.generate).
"""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "tiny_arithmetic",
        Path(__file__).with_name("domain.yaml"),
        description="Tiny world: two-number word problems with a worked answer, scored by exact match.",
        reference="arXiv:2110.14168",
    )
