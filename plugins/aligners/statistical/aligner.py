"""Statistical token alignment: FuseChat's mapping statistics (arXiv:2402.16107).

Over a corpus, both tokenizers cut each text and the two cuts are aligned (by character offsets, or FuseLLM's
dynamic programme where a tokenizer gives none: :func:`mergeplug.alignment.align_many`). Every counted pair
(source token, pivot token) adds one to a co-occurrence count; each source token then maps to the pivot token it
is most often aligned with (``selection: most_frequent``; ties to the lowest pivot id). Which pairs count
(``pairs``): ``same_start`` (default, our choice) counts tokens that start at the same character, which are the
tokens a source's and the pivot's next-token distributions predict at paired positions, so the map learns the
substitution the fusion loss needs; ``all`` counts every pair of tokens of an aligned group, as FuseChat's released
code counts every step of its alignment path. ``selection: weighted_distance`` follows the released code's
choice instead: among co-aligned pivot tokens the least FuseLLM distance (edit distance of the texts, times 0.1
when one contains the other) times sigmoid(count).

Source tokens seen fewer than ``min_count`` times take the ``fallback``: the nearest pivot token by edit
distance (FuseLLM's MinED, arXiv:2401.10491; default), the pivot's unknown token (the released code), or none.
Special tokens map by role and are never counted. After ``fit``, ``counts`` holds the co-occurrence triplets
(source ids, pivot ids, counts) and ``observed`` marks the source tokens mapped from the statistics.
"""
from pathlib import Path

import numpy as np

from mergeplug import MergeplugError
from mergeplug.alignment import (
    ROLE_CODES, NearestTokenIndex, TokenAligner, Vocabulary, corpus_alignments, edit_distance_pairs, special_token_map,
)

_COMPACT_EVERY = 1 << 20  # pending pair keys before they are folded into (key, count) form: bounds memory


class StatisticalAligner(TokenAligner):
    name = "statistical"
    parameters_file = Path(__file__).with_name("parameters.json")

    def build_map(self, source: Vocabulary, pivot: Vocabulary, corpus_pairs=None):
        if corpus_pairs is None:
            raise MergeplugError("aligner 'statistical' needs corpus_pairs (texts, or (source, pivot) tokenisation "
                                 "pairs) to count co-aligned tokens; use aligner 'mined' without a corpus")
        src_ids, piv_ids, counts = self._count(source, pivot, corpus_pairs)
        self.counts = (src_ids, piv_ids, counts)
        token_map = special_token_map(source, pivot)
        keep = counts >= self.parameters["min_count"]
        src_ids, piv_ids, counts = src_ids[keep], piv_ids[keep], counts[keep]
        if self.parameters["selection"] == "most_frequent":
            order = np.lexsort((piv_ids, -counts, src_ids))
        else:
            cost = _fusellm_distance(source, pivot, src_ids, piv_ids) / (1.0 + np.exp(-counts.astype(np.float64)))
            order = np.lexsort((piv_ids, cost, src_ids))
        src_sorted = src_ids[order]
        first = np.concatenate([[True], src_sorted[1:] != src_sorted[:-1]]) if src_sorted.size else src_sorted.astype(bool)
        token_map[src_sorted[first]] = piv_ids[order][first]
        self.observed = np.zeros(source.size, bool)
        self.observed[src_sorted[first]] = True

        unseen = np.setdiff1d(source.ordinary_ids, src_sorted[first])
        fallback = self.parameters["fallback"]
        if fallback == "nearest" and unseen.size:
            targets = pivot.ordinary_ids
            index = NearestTokenIndex([pivot.surfaces[i] for i in targets], targets, pivot.byte_fallback[targets])
            token_map[unseen], _ = index.nearest(source.surfaces[i] for i in unseen.tolist())
        elif fallback == "unk":
            token_map[unseen] = pivot.role_ids.get(ROLE_CODES["unk"], -1)
        return token_map

    def _count(self, source: Vocabulary, pivot: Vocabulary, corpus_pairs):
        """Co-occurrence triplets (source ids, pivot ids, counts) over the corpus, sorted by key."""
        keys = np.zeros(0, np.int64)
        weights = np.zeros(0, np.int64)
        pending: list[np.ndarray] = []
        pending_size = 0
        pivot_ordinary = (pivot.roles == 0) & np.array([bool(s) for s in pivot.surfaces])
        for src_tok, piv_tok, alignment in corpus_alignments(self.source_tokenizer, self.pivot_tokenizer, corpus_pairs):
            if self.parameters["pairs"] == "same_start":
                at = alignment.pivot_to_source("start")
                piv_pos = np.flatnonzero(at >= 0)
                src_pos = at[piv_pos]
            else:
                piv_pos, src_pos = alignment.pairs()
            s, p = src_tok.ids[src_pos], piv_tok.ids[piv_pos]
            valid = (s >= 0) & (s < source.size) & (p >= 0) & (p < pivot.size)
            s, p = s[valid], p[valid]
            ordinary = (source.roles[s] == 0) & pivot_ordinary[p]
            pending.append(s[ordinary] * pivot.size + p[ordinary])
            pending_size += pending[-1].size
            if pending_size >= _COMPACT_EVERY:
                keys, weights = _fold(keys, weights, pending)
                pending, pending_size = [], 0
        keys, weights = _fold(keys, weights, pending)
        return keys // pivot.size, keys % pivot.size, weights


def _fold(keys: np.ndarray, weights: np.ndarray, pending: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    merged = np.concatenate([keys, *pending])
    merged_weights = np.concatenate([weights, np.ones(merged.size - keys.size, np.int64)])
    unique, inverse = np.unique(merged, return_inverse=True)
    return unique, np.bincount(inverse.reshape(-1), weights=merged_weights, minlength=unique.size).astype(np.int64)


def _fusellm_distance(source: Vocabulary, pivot: Vocabulary, src_ids: np.ndarray, piv_ids: np.ndarray) -> np.ndarray:
    """FuseLLM's token distance (arXiv:2401.10491): edit distance of the texts without spaces, x0.1 if nested."""
    left = [source.surfaces[i].replace(" ", "") for i in src_ids.tolist()]
    right = [pivot.surfaces[i].replace(" ", "") for i in piv_ids.tolist()]
    dist = edit_distance_pairs(left, right).astype(np.float64)
    nested = np.array([a in b or b in a for a, b in zip(left, right)], dtype=bool)
    return np.where(nested, 0.1 * dist, dist)
