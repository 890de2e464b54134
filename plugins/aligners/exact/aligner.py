"""Exact token alignment, for a source that shares the pivot's vocabulary (identical token strings).

FuseChat (arXiv:2402.16107) aligns distributions of models with different vocabularies; when the vocabularies
are the same, no mapping is needed: each source token is the pivot token with the same string (ids may differ).
Special tokens map by role (:func:`mergeplug.alignment.special_token_map`), falling back to the same string.
When a source token is missing from the pivot, fitting fails in one line that names the other aligners.
"""
from pathlib import Path

from mergeplug import MergeplugError
from mergeplug.alignment import TokenAligner, Vocabulary, special_token_map


class ExactAligner(TokenAligner):
    name = "exact"
    parameters_file = Path(__file__).with_name("parameters.json")

    def build_map(self, source: Vocabulary, pivot: Vocabulary, corpus_pairs=None):
        token_map = special_token_map(source, pivot)
        pivot_ids = {token: i for i, token in enumerate(pivot.tokens) if token is not None}
        missing = []
        for i, token in enumerate(source.tokens):
            if token is None or token_map[i] >= 0:
                continue
            if token in pivot_ids:
                token_map[i] = pivot_ids[token]
            else:
                missing.append(token)
        if missing:
            examples = ", ".join(repr(t) for t in missing[:3])
            raise MergeplugError(
                f"aligner 'exact': {len(missing)} of {source.size} source tokens (e.g. {examples}) are not in the "
                f"pivot vocabulary; the vocabularies differ: use aligner 'mined' or 'statistical'"
            )
        return token_map
