"""Errors a user can act on. The CLI prints them as one line each and exits with code 2."""
from __future__ import annotations

import difflib
from typing import Iterable


class MergeplugError(Exception):
    """Bad user input or an unusable plugin: printed without a traceback.

    ``problems`` holds one line per problem; ``str(error)`` joins them with newlines.
    """

    exit_code = 2

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p] or ["unknown error"]
        super().__init__("\n".join(self.problems))


class UnknownComponentError(MergeplugError):
    """A recipe or command named a component that no loaded plugin provides."""


class ComponentConflictError(MergeplugError):
    """Two plugins registered a component of the same kind and name."""


def closest_first(name: str, candidates: Iterable[str]) -> list[str]:
    """All candidates, the ones most similar to ``name`` first (then alphabetical)."""
    candidates = sorted(set(candidates))
    if not candidates:  # difflib refuses n=0
        return []
    ranked = difflib.get_close_matches(name, candidates, n=len(candidates), cutoff=0.0)
    return ranked


def unknown_name_message(what: str, name: str, known: Iterable[str]) -> str:
    known = closest_first(name, known)
    if not known:
        return f"unknown {what} {name!r}: no {what} is installed (see `mergeplug list`)"
    return f"unknown {what} {name!r}; known: {', '.join(known)}"
