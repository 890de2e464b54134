"""Sequence alignment of two tokenisations of one text: by character offsets, and FuseLLM's DP without them."""
from __future__ import annotations

import numpy as np
import pytest

from mergeplug import MergeplugError
from mergeplug.alignment import (
    ROLE_CODES, Tokenization, align, align_by_edit_distance, align_by_offsets, align_many,
)


def cut(text: str, pieces: list[str], roles: dict[int, str] | None = None) -> Tokenization:
    """A tokenisation whose tokens are ``pieces`` in order; a piece "" at index i with a role is a special token
    with an empty span (as a template-added BOS/EOS gets)."""
    offsets, at = [], 0
    for piece in pieces:
        if piece:
            at = text.index(piece, at)
        offsets.append((at, at + len(piece)))
        at += len(piece)
    codes = [ROLE_CODES[(roles or {}).get(i, "")] if i in (roles or {}) else 0 for i in range(len(pieces))]
    return Tokenization(text, list(pieces), np.array(offsets), roles=np.array(codes))


def groups(a) -> tuple[list[int], list[int]]:
    return a.pivot_group.tolist(), a.source_group.tolist()


def test_one_pivot_token_covering_several_source_tokens_and_back():
    text = "hello world"
    pivot = cut(text, ["hello", " world"])
    source = cut(text, ["hel", "lo", " ", "world"])
    a = align_by_offsets(pivot, source)
    assert groups(a) == ([0, 1], [0, 0, 1, 1])
    assert a.pivot_to_source("end").tolist() == [1, 3]  # both have read "hello" / "hello world"
    assert a.pivot_to_source("start").tolist() == [0, 2]  # both start at "h" / " "
    assert [list(x) for x in zip(*a.pairs())] == [[0, 0], [0, 1], [1, 2], [1, 3]]
    p_sizes, s_sizes = a.group_sizes()
    assert p_sizes.tolist() == [1, 1] and s_sizes.tolist() == [2, 2]

    back = align_by_offsets(source, pivot)  # many pivot tokens onto one source token
    assert groups(back) == ([0, 0, 1, 1], [0, 1])
    assert back.pivot_to_source("end").tolist() == [-1, 0, -1, 1]
    assert back.pivot_to_source("start").tolist() == [0, -1, 1, -1]


def test_crossing_boundaries_make_one_many_to_many_group():
    text = "abcd xy"
    a = align_by_offsets(cut(text, ["ab", "cd", " xy"]), cut(text, ["a", "bc", "d", " x", "y"]))
    assert groups(a) == ([0, 0, 1], [0, 0, 0, 1, 1])
    assert a.pivot_to_source("end").tolist() == [-1, 2, 4]


@pytest.mark.parametrize("source_pieces, source_offsets, expected_source", [
    (["hello ", "world"], [(0, 6), (6, 11)], [0, 1]),  # space glued to the previous token
    (["hello", "world"], [(0, 5), (6, 11)], [0, 1]),  # space in no token (WordPiece, trim_offsets)
    (["hello", " ", "world"], [(0, 5), (5, 6), (6, 11)], [0, 1, 1]),  # a lone space token
])
def test_whitespace_conventions_pair_the_words(source_pieces, source_offsets, expected_source):
    text = "hello world"
    pivot = cut(text, ["hello", " world"])  # byte-level BPE: space glued to the next word
    source = Tokenization(text, source_pieces, np.array(source_offsets))
    a = align_by_offsets(pivot, source)
    assert groups(a) == ([0, 1], expected_source)
    assert a.pivot_to_source("end").tolist() == [0, len(source_pieces) - 1]


def test_a_whitespace_token_the_other_side_covers_nothing_of_is_unpaired():
    text = "hello world"
    pivot = cut(text, ["hello", " ", "world"])
    source = Tokenization(text, ["hello", "world"], np.array([(0, 5), (6, 11)]))
    a = align_by_offsets(pivot, source)
    assert groups(a) == ([0, -1, 1], [0, 1])
    assert a.pivot_to_source("end").tolist() == [0, -1, 1]


def test_special_tokens_with_empty_spans_pair_by_role_and_place():
    text = "hi there"
    pivot = cut(text, ["", "hi", " there", ""], roles={0: "bos", 3: "eos"})
    pivot.offsets[3] = (0, 0)  # tokenizers give a template's EOS the span (0, 0), wherever it is
    source = cut(text, ["hi", " ", "there", "", ""], roles={3: "eos", 4: "pad"})
    source.offsets[3:] = 0
    a = align_by_offsets(pivot, source)
    assert groups(a) == ([-1, 0, 1, 2], [0, 1, 1, 2, -1])  # BOS and PAD have no counterpart
    assert a.pivot_to_source("end").tolist() == [-1, 0, 2, 3]


def test_byte_pieces_of_one_character_share_its_group():
    text = "é!"
    pivot = Tokenization(text, ["é", "!"], np.array([(0, 1), (1, 2)]))
    source = Tokenization(text, ["Ã", "©", "!"], np.array([(0, 1), (0, 1), (1, 2)]))
    a = align_by_offsets(pivot, source)
    assert groups(a) == ([0, 1], [0, 0, 1])
    assert a.pivot_to_source("end").tolist() == [1, 2]


def test_an_ordinary_token_with_an_empty_span_joins_the_group_at_its_position():
    text = "ab"
    pivot = Tokenization(text, ["▁", "ab"], np.array([(0, 0), (0, 2)]))
    source = Tokenization(text, ["a", "b"], np.array([(0, 1), (1, 2)]))
    assert groups(align_by_offsets(pivot, source)) == ([0, 0], [0, 0])


def test_batched_alignment_equals_one_by_one():
    texts = ["hello world", "  indented\n\tcode()", "", "a  b"]
    pivots = [cut(t, [t[:3], t[3:]] if t else []) for t in texts]
    sources = [cut(t, list(t)) for t in texts]
    batched = align_many(pivots, sources)
    for p, s, b in zip(pivots, sources, batched):
        single = align_by_offsets(p, s)
        assert groups(b) == groups(single)
        assert b.method == "offsets"
    assert groups(batched[2]) == ([], [])
    assert groups(batched[0]) == ([0, 1], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])


def test_the_dynamic_programme_gives_the_offsets_pairs_on_unambiguous_text():
    text = "the cat sat on the mat"
    pivot = cut(text, ["the", " cat", " sat", " on", " the", " mat"])
    source = cut(text, ["the", " c", "at", " sat", " o", "n", " the", " ma", "t"])
    by_offsets = align_by_offsets(pivot, source)
    by_dp = align_by_edit_distance(pivot, source)
    assert by_dp.method == "edit_distance"
    assert groups(by_dp) == groups(by_offsets) == ([0, 1, 2, 3, 4, 5], [0, 1, 1, 2, 3, 3, 4, 5, 5])
    assert by_dp.agreement(by_offsets) == 1.0
    # and the other way round: many pivot tokens onto one source token
    assert groups(align_by_edit_distance(source, pivot)) == groups(align_by_offsets(source, pivot))


def test_align_uses_the_dynamic_programme_only_when_offsets_are_missing():
    text = "ab cd"
    pivot, source = cut(text, ["ab", " cd"]), cut(text, ["a", "b", " cd"])
    assert align(pivot, source).method == "offsets"
    no_offsets = Tokenization(text, source.tokens)
    a = align(pivot, no_offsets)
    assert a.method == "edit_distance"
    assert groups(a) == ([0, 1], [0, 0, 1])


def test_the_dynamic_programme_drifts_on_repeated_whitespace():
    text = "x  =  1"
    pivot = cut(text, ["x", " ", " =", " ", " 1"])
    source = cut(text, ["x", "  ", "=", "  ", "1"])
    by_offsets, by_dp = align_by_offsets(pivot, source), align_by_edit_distance(pivot, source)
    assert groups(by_offsets) == ([0, 1, 1, 2, 2], [0, 1, 1, 2, 2])
    assert by_dp.agreement(by_offsets) < 1.0


def test_tokenisations_of_different_texts_are_refused():
    with pytest.raises(MergeplugError, match="different texts"):
        align(cut("ab", ["ab"]), cut("ac", ["ac"]))
    with pytest.raises(MergeplugError, match="3 tokens but 2 offsets"):
        Tokenization("abc", ["a", "b", "c"], np.array([(0, 1), (1, 2)]))
