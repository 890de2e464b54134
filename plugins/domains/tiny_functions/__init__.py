"""One-line Python string functions scored by pass@1 in the sandbox: a domain of the tiny world.

The domain is data: domain.yaml, and the JSONL files generate.py writes beside it (python -m
mergeplug_plugins.domains.tiny_functions.generate).
"""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register(
        "tiny_functions",
        Path(__file__).with_name("domain.yaml"),
        description="Tiny world: one-line Python string functions from templates, scored by pass@k.",
        reference="arXiv:2107.03374",
    )
