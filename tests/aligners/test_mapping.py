"""Token surfaces, special tokens, byte fallback, and moving top-k distributions onto the pivot vocabulary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeplug import MergeplugError
from mergeplug.alignment import (
    ROLE_CODES, SequenceAlignment, TokenAligner, Vocabulary, normalize_token, special_token_map, tokenize,
)


class FixedMap(TokenAligner):
    """An aligner whose map is given: isolates map_distribution from any mapping rule."""

    name = "fixed"

    def __init__(self, token_map):
        super().__init__()
        self.given = np.asarray(token_map)

    def build_map(self, source, pivot, corpus_pairs=None):
        return self.given


def fitted(token_map, pivot_size: int) -> FixedMap:
    source = Vocabulary.from_tokens([f"s{i}" for i in range(len(token_map))])
    pivot = Vocabulary.from_tokens([f"p{i}" for i in range(pivot_size)])
    return FixedMap(token_map).fit(source, pivot)


@pytest.mark.parametrize("token, scheme, surface", [
    ("Ġworld", "byte_level", " world"),
    ("Ċ", "byte_level", "\n"),
    ("ĠĠĠ", "byte_level", "   "),
    ("âĢĻ", "byte_level", "\u2019"),  # three bytes of one character
    ("â", "byte_level", "\udce2"),  # a lone byte that is not a whole character
    ("▁world", "metaspace", " world"),
    ("<0x0A>", "metaspace", "\n"),
    ("<0xE2>", "metaspace", "\udce2"),
    ("##ing", "wordpiece", "ing"),
    ("##", "wordpiece", "##"),
    ("<|im_end|>", "byte_level", "<|im_end|>"),
])
def test_surfaces_are_the_text_a_token_stands_for(token, scheme, surface):
    assert normalize_token(token, scheme) == surface


def test_map_distribution_merges_duplicates_drops_unmapped_and_renormalises():
    aligner = fitted([2, 2, 0, -1], pivot_size=3)  # sources 0 and 1 both become pivot 2; source 3 has none
    ids = np.array([[0, 1, 2], [3, 2, 1]])
    logprobs = np.log(np.array([[0.5, 0.2, 0.1], [0.3, 0.3, 0.2]]))
    out_ids, out_lp = aligner.map_distribution(ids, logprobs)
    # row 0: pivot 2 = 0.5 + 0.2, pivot 0 = 0.1, over 0.8; row 1: pivot 0 = 0.3, pivot 2 = 0.2, over 0.5
    assert out_ids.tolist() == [[0, 2, -1], [0, 2, -1]]
    np.testing.assert_allclose(np.exp(out_lp), [[0.125, 0.875, 0.0], [0.6, 0.4, 0.0]], rtol=1e-12)
    np.testing.assert_allclose(np.exp(out_lp).sum(1), [1.0, 1.0], rtol=1e-12)
    assert out_lp[0, 2] == -np.inf


def test_map_distribution_keeps_small_probabilities_and_handles_padding_and_empty_rows():
    aligner = fitted([0, 1, -1], pivot_size=2)
    ids = np.array([[0, 1, -1], [2, -1, 2], [1, 0, 5]])  # -1: padding; 5: beyond the source vocabulary
    logprobs = np.array([[0.0, -200.0, -1.0], [-1.0, -1.0, -1.0], [-0.5, -1.5, -0.1]], dtype=np.float32)
    out_ids, out_lp = aligner.map_distribution(ids, logprobs)
    assert out_ids.tolist() == [[0, 1, -1], [-1, -1, -1], [0, 1, -1]]
    assert out_lp.dtype == np.float32
    assert out_lp[0, 1] == pytest.approx(-200.0)  # exp(-200) survives as a log-probability
    assert np.all(out_lp[1] == -np.inf)  # nothing mapped: all padding
    expected = np.log(np.exp([-1.5, -0.5]) / np.exp([-1.5, -0.5]).sum())
    np.testing.assert_allclose(out_lp[2, :2], expected, rtol=1e-6)


def test_map_distribution_runs_of_three_duplicates_and_torch_tensors():
    aligner = fitted([1, 1, 1, 0], pivot_size=2)
    ids = torch.tensor([[0, 3, 1, 2]])
    logprobs = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64))
    out_ids, out_lp = aligner.map_distribution(ids, logprobs)
    assert isinstance(out_ids, torch.Tensor) and out_ids.dtype == torch.int64
    assert out_lp.dtype == torch.float64
    assert out_ids.tolist() == [[0, 1, -1, -1]]
    torch.testing.assert_close(out_lp.exp(), torch.tensor([[0.4, 0.6, 0.0, 0.0]], dtype=torch.float64))


def test_align_distributions_places_source_distributions_at_their_pivot_positions():
    aligner = fitted([0, 1, 2], pivot_size=3)
    alignment = SequenceAlignment(np.array([0, 0, 1]), np.array([0, 1, 1]), "offsets")  # 2:1 then 1:2
    ids = np.array([[0, 1], [1, 2], [2, 0]])
    logprobs = np.log(np.array([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3]]))
    out_ids, out_lp = aligner.align_distributions(alignment, ids, logprobs, anchor="end")
    assert out_ids.tolist() == [[-1, -1], [0, 1], [0, 2]]  # pivot 1 <- source 0; pivot 2 <- source 2
    np.testing.assert_allclose(np.exp(out_lp), [[0, 0], [0.9, 0.1], [0.3, 0.7]])
    with pytest.raises(MergeplugError, match="3 source distributions for 2"):
        aligner.align_distributions(SequenceAlignment(np.array([0]), np.array([0, 0]), "offsets"), ids, logprobs)


def test_map_distribution_needs_a_fit_and_matching_shapes():
    with pytest.raises(MergeplugError, match="call fit"):
        FixedMap([0]).map_distribution(np.zeros((1, 1), int), np.zeros((1, 1)))
    with pytest.raises(MergeplugError, match=r"must both be \[positions, k\]"):
        fitted([0], 1).map_distribution(np.zeros((2, 3), int), np.zeros((2, 2)))


def test_special_tokens_map_by_role_and_are_never_mined():
    source = Vocabulary.from_tokens(["<s>", "</s>", "<pad>", "<tool>", "hi"], "plain",
                                    {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "tool": "<tool>"})
    pivot = Vocabulary.from_tokens(["hi", "<|begin|>", "<|end|>", "<s>"], "plain",
                                   {"bos": "<|begin|>", "eos": "<|end|>"})
    token_map = special_token_map(source, pivot)
    # bos/eos by role (different strings); pad and the extra special have no counterpart: -1, even though the
    # pivot has an ordinary token "<s>" and could be mined for them
    assert token_map.tolist() == [1, 2, -1, -1, -1]
    assert source.roles.tolist()[:3] == [ROLE_CODES["bos"], ROLE_CODES["eos"], ROLE_CODES["pad"]]
    assert source.ordinary_ids.tolist() == [4]
    assert pivot.ordinary_ids.tolist() == [0, 3]


def test_byte_fallback_tokens_and_vocabulary_of_a_real_tokenizer(tmp_path):
    from mergeplug.testing import train_tiny_tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(train_tiny_tokenizer(tmp_path / "tok")))
    vocab = Vocabulary.of(tokenizer)
    assert Vocabulary.of(tokenizer) is vocab  # cached per tokenizer
    assert vocab.scheme == "metaspace"
    assert {ROLE_CODES[r]: i for r, i in (("unk", 0), ("pad", 1), ("bos", 2), ("eos", 3))} == vocab.role_ids
    metaspace = Vocabulary.from_tokens(["<0x0A>", "<0x41>", "A", "▁the"], "metaspace")
    assert metaspace.surfaces == ["\n", "A", "A", " the"]
    assert metaspace.byte_fallback.tolist() == [True, True, False, False]
    text = "Merging combines the weights"
    tokens = tokenize(tokenizer, text)
    assert tokens.offsets is not None and tokens.ids.tolist() == tokenizer(text)["input_ids"]
    assert "".join(tokens.surfaces()).strip() == text
