"""Mined token alignment: FuseLLM's minimum-edit-distance vocabulary mapping (MinED, arXiv:2401.10491).

Each ordinary source token maps to the pivot token whose surface (the text it stands for, markers such as
``Ġ``/``▁`` normalised to a space, byte-fallback tokens to their byte: :func:`mergeplug.alignment.normalize_token`)
is at minimum Levenshtein distance, searched over the whole pivot vocabulary. An identical surface is taken first
(FuseLLM also looks the token up before measuring distances); the search is indexed
(:class:`mergeplug.alignment.NearestTokenIndex`: a dictionary, a deletion neighbourhood for one edit, then length
buckets with a histogram bound), so it does not cost one edit distance per pivot token per source token. Ties go
to a non-byte-fallback token, then to the lowest pivot id (FuseLLM takes the first minimum in vocabulary order).
Special tokens map by role and are never mined. ``max_distance`` (default null: no limit, as in FuseLLM) leaves
farther tokens unmapped. The fitted map is cached on disk, named by a hash of both vocabularies (``cache``).
After ``fit``, ``distances`` holds each source token's distance to its match (-1: special or unmapped).
"""
from pathlib import Path

import numpy as np

from mergeplug.alignment import NearestTokenIndex, TokenAligner, Vocabulary, cached_arrays, special_token_map


class MinedAligner(TokenAligner):
    name = "mined"
    parameters_file = Path(__file__).with_name("parameters.json")

    def build_map(self, source: Vocabulary, pivot: Vocabulary, corpus_pairs=None):
        max_distance = self.parameters["max_distance"]

        def build():
            return mine(source, pivot, max_distance)

        if self.parameters["cache"]:
            key = {"source": source.fingerprint, "pivot": pivot.fingerprint, "max_distance": max_distance}
            arrays = cached_arrays("mined", key, build)
        else:
            arrays = build()
        self.distances = arrays["distances"]
        return arrays["token_map"]


def mine(source: Vocabulary, pivot: Vocabulary, max_distance: int | None = None) -> dict[str, np.ndarray]:
    """``token_map`` and ``distances`` (int64 [source size]) of the minimum-edit-distance mapping."""
    token_map = special_token_map(source, pivot)
    distances = np.full(source.size, -1, np.int64)
    targets = pivot.ordinary_ids
    index = NearestTokenIndex([pivot.surfaces[i] for i in targets], targets, pivot.byte_fallback[targets])
    queries = source.ordinary_ids
    ids, dist = index.nearest((source.surfaces[i] for i in queries.tolist()), max_distance)
    token_map[queries] = ids
    distances[queries] = dist
    return {"token_map": token_map, "distances": distances}
