"""mergeplug: build, merge, fuse and evaluate domain-specialised LLMs through one plugin system.

The public API for plugin authors is what this module exports; a plugin imports nothing else of mergeplug.
Importing it is cheap: heavy pieces (torch, transformers) load only when a command needs them.
"""
from __future__ import annotations

from .errors import MergeplugError
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["MergeplugError", "hookimpl", "__version__", "get_registry"]


def get_registry():
    """The registry of installed plugins and their components (loaded on first use)."""
    from .plugins import get_registry as _get

    return _get()
