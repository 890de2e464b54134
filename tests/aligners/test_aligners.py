"""The aligner plugins (exact, mined, statistical) through the real plugin manager, on hand-made and real vocabularies."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from mergeplug import MergeplugError
from mergeplug.alignment import (
    NearestTokenIndex, TokenAligner, Tokenization, Vocabulary, align_many, edit_distance, tokenize_many,
)
from mergeplug.plugins import Registry
from mergeplug.testing import TINY_CORPUS


@pytest.fixture(scope="module")
def registry():
    return Registry()


def load(registry, name):
    return registry.get("aligner", name).load()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEPLUG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_every_aligner_loads_through_the_plugin_manager(registry):
    for name in ("exact", "mined", "statistical"):
        component = registry.get("aligner", name)
        cls = component.load()
        assert isinstance(cls, type) and issubclass(cls, TokenAligner) and cls.name == name
        assert re.match(r"^arXiv:\d{4}\.\d{5}$", component.reference)
        assert all("default" in p for p in component.parameters["properties"].values())
        assert component.extra["needs_corpus"] is (name == "statistical")
    with pytest.raises(MergeplugError, match="max_distance"):
        load(registry, "mined")({"max_distance": -1})
    with pytest.raises(MergeplugError, match="did you mean 'max_distance'"):
        load(registry, "mined")({"max_distanse": 2})


def test_exact_maps_identical_strings_and_refuses_different_vocabularies(registry):
    exact = load(registry, "exact")
    source = Vocabulary.from_tokens(["<s>", "a", "b", "ab"], "plain", {"bos": "<s>"})
    shuffled = Vocabulary.from_tokens(["ab", "b", "<s>", "a", "extra"], "plain", {"bos": "<s>"})
    assert exact().fit(source, shuffled).token_map.tolist() == [2, 3, 1, 0]
    assert exact().fit(source, source).token_map.tolist() == [0, 1, 2, 3]
    other = Vocabulary.from_tokens(["<s>", "a", "c"], "plain", {"bos": "<s>"})
    with pytest.raises(MergeplugError) as error:
        exact().fit(source, other)
    message = str(error.value)
    assert "\n" not in message and "2 of 4 source tokens" in message and "use aligner 'mined' or 'statistical'" in message


def brute_force(queries, entries, ids, demoted):
    """Nearest entry by scanning every entry: (distance, demoted, id) smallest."""
    out = []
    for q in queries:
        out.append(min((edit_distance(q, e), bool(d), i) for e, i, d in zip(entries, ids, demoted) if e))
    return out


def test_mined_picks_the_minimum_edit_distance_token_like_brute_force(registry):
    rng = random.Random(7)
    words = sorted({"".join(rng.choice("abcd ") for _ in range(rng.randint(2, 9))) for _ in range(300)})
    pivot_tokens = ["<unk>", "<0x61>", *words[:150], "a"]
    source_tokens = ["<unk>", *words[100:], "zzzzzzzzzzzz", "a" * 14, "x", "a"]
    pivot = Vocabulary.from_tokens(pivot_tokens, "metaspace", {"unk": "<unk>"})
    source = Vocabulary.from_tokens(source_tokens, "metaspace", {"unk": "<unk>"})
    aligner = load(registry, "mined")({"cache": False}).fit(source, pivot)
    expected = brute_force([source.surfaces[i] for i in source.ordinary_ids],
                           [pivot.surfaces[i] for i in pivot.ordinary_ids], pivot.ordinary_ids.tolist(),
                           pivot.byte_fallback[pivot.ordinary_ids].tolist())
    assert aligner.token_map[source.ordinary_ids].tolist() == [e[2] for e in expected]
    assert aligner.distances[source.ordinary_ids].tolist() == [e[0] for e in expected]
    assert aligner.token_map[0] == 0  # <unk> by role
    # "a" is at distance 0 from both the byte-fallback <0x61> (id 1) and the text token "a": the text token wins
    assert pivot.surfaces[1] == "a" and aligner.token_map[len(source_tokens) - 1] == len(pivot_tokens) - 1
    assert {d for d, _, _ in expected} >= {0, 1, 2}  # exact, one edit and farther searches all exercised
    bounded = load(registry, "mined")({"cache": False, "max_distance": 1}).fit(source, pivot)
    far = aligner.distances > 1
    assert np.all(bounded.token_map[far] == -1)
    assert np.array_equal(bounded.token_map[~far], aligner.token_map[~far])


def test_nearest_index_prefers_text_tokens_over_byte_fallback_and_low_ids():
    index = NearestTokenIndex(["a", "a", "ab", "b"], ids=[10, 5, 7, 3], demoted=[True, False, False, False])
    ids, dist = index.nearest(["a", "ba", "c", "", "abab"])
    # "a": the non-demoted id 5; "ba": "a"/"b"/"ab" at 1 -> lowest id among non-demoted = 3 ("b");
    # "c": every one-letter token at 1 -> id 3; "": nearest is any one-letter token at 1 -> id 3
    assert ids.tolist() == [5, 3, 3, 3, 7]
    assert dist.tolist() == [0, 1, 1, 1, 2]


def test_mined_map_is_cached_on_disk_and_a_corrupt_cache_is_rebuilt(registry, tmp_path):
    mined = load(registry, "mined")
    source = Vocabulary.from_tokens(["ab", "abc", "zz"])
    pivot = Vocabulary.from_tokens(["abd", "ab", "z"])
    first = mined().fit(source, pivot).token_map
    assert first.tolist() == [1, 0, 2]
    cached = list((tmp_path / "cache" / "aligners").glob("mined-*.npz"))
    assert len(cached) == 1
    cached[0].write_bytes(b"not an npz")
    assert mined().fit(source, pivot).token_map.tolist() == [1, 0, 2]
    assert mined().fit(source, Vocabulary.from_tokens(["zz", "ab"])).token_map.tolist() == [1, 1, 0]
    assert len(list((tmp_path / "cache" / "aligners").glob("mined-*.npz"))) == 2


def hand_corpus():
    """(source, pivot) tokenisations with ids; source vocab: <unk> ab c abc z; pivot: <unk> a b ab c bc."""
    source_ids = {"ab": 1, "c": 2, "abc": 3}
    pivot_ids = {"a": 1, "b": 2, "ab": 3, "c": 4, "bc": 5}

    def tok(text, pieces, ids):
        offsets, at = [], 0
        for piece in pieces:
            offsets.append((at, at + len(piece)))
            at += len(piece)
        return Tokenization(text, pieces, np.array(offsets), np.array([ids[p] for p in pieces]))

    rows = [("abc", ["ab", "c"], ["a", "bc"]), ("ab", ["ab"], ["a", "b"]), ("ab", ["ab"], ["ab"]),
            ("c", ["c"], ["c"]), ("abc", ["abc"], ["ab", "c"])]
    return [(tok(t, s, source_ids), tok(t, p, pivot_ids)) for t, s, p in rows]


SOURCE = Vocabulary.from_tokens(["<unk>", "ab", "c", "abc", "z"], "plain", {"unk": "<unk>"})
PIVOT = Vocabulary.from_tokens(["<unk>", "a", "b", "ab", "c", "bc"], "plain", {"unk": "<unk>"})


@pytest.mark.parametrize("parameters, expected", [
    # same_start counts: ab->a 2, ab->ab 1; c->c 1; abc->ab 1; z unseen -> nearest ("a", "b", "c" at 1: id 1)
    ({}, [0, 1, 4, 3, 1]),
    # released-code choice: ab->ab (distance 0) beats ab->a (0.1 x 1 x sigmoid(2))
    ({"selection": "weighted_distance"}, [0, 3, 4, 3, 1]),
    # all pairs: ab: a 2, bc 1, b 1, ab 1 -> a; c: a, bc, c once each -> lowest id a; abc: ab, c -> ab
    ({"pairs": "all"}, [0, 1, 1, 3, 1]),
    ({"fallback": "unk"}, [0, 1, 4, 3, 0]),
    ({"fallback": "none"}, [0, 1, 4, 3, -1]),
    # min_count 2: only ab->a is counted twice; the rest take the nearest (c->c, abc->ab at distance 1)
    ({"min_count": 2}, [0, 1, 4, 3, 1]),
])
def test_statistical_maps_each_token_to_its_most_frequent_partner(registry, parameters, expected):
    aligner = load(registry, "statistical")(parameters).fit(SOURCE, PIVOT, hand_corpus())
    assert aligner.token_map.tolist() == expected
    if parameters == {}:
        src, piv, counts = aligner.counts
        assert sorted(zip(src.tolist(), piv.tolist(), counts.tolist())) == [(1, 1, 2), (1, 3, 1), (2, 4, 1), (3, 3, 1)]
        assert aligner.observed.tolist() == [False, True, True, True, False]


def test_statistical_needs_a_corpus(registry):
    with pytest.raises(MergeplugError, match="needs corpus_pairs"):
        load(registry, "statistical")().fit(SOURCE, PIVOT)


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """A byte-level BPE (GPT-2 style, EOS appended) and a metaspace Unigram (BOS prepended), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = TINY_CORPUS * 8
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)])
    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                           unk_token="<unk>", show_progress=False))
    uni.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    source = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    pivot = PreTrainedTokenizerFast(tokenizer_object=uni, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return source, pivot


SENTENCES = [
    "The quick brown fox merges two models!",
    "def add(a, b):\n    return a + b  # sums 12 and 30",
    "Bonjour, comment allez-vous?  Très bien.",
]


def test_real_bpe_and_unigram_tokenisations_align_on_characters(two_tokenizers):
    source_tok, pivot_tok = two_tokenizers
    sources, pivots = tokenize_many(source_tok, SENTENCES), tokenize_many(pivot_tok, SENTENCES)
    for text, s, p, a in zip(SENTENCES, sources, pivots, align_many(pivots, sources)):
        assert a.method == "offsets"
        for g in range(a.n_groups):
            piv = np.flatnonzero(a.pivot_group == g)
            src = np.flatnonzero(a.source_group == g)
            if p.roles[piv[0]] and p.offsets[piv[0], 0] == p.offsets[piv[0], 1]:  # a template special (EOS)
                assert p.roles[piv].tolist() == s.roles[src].tolist() and s.roles[src[0]] != 0
                continue
            covered = lambda tok, pos: text[tok.offsets[pos, 0].min():tok.offsets[pos, 1].max()].strip()
            assert covered(p, piv) == covered(s, src)  # each group covers the same characters
        # every character is in some paired token on both sides
        for tok, group in ((p, a.pivot_group), (s, a.source_group)):
            unpaired = np.flatnonzero(group < 0)
            assert all(tok.roles[i] or not text[tok.offsets[i, 0]:tok.offsets[i, 1]].strip() for i in unpaired)
        # the BOS of the Unigram has no counterpart; the EOS of both are paired
        assert a.pivot_group[0] == -1 and a.pivot_group[-1] >= 0 and a.pivot_group[-1] == a.source_group[-1]
        # end-anchored pairs have read the same text: equal end offsets, up to where a space run was put
        ends = a.pivot_to_source("end")
        paired = np.flatnonzero((ends >= 0) & (p.roles == 0))
        assert paired.size > len(p) // 3
        for i in paired.tolist():
            assert text[:p.offsets[i, 1]].rstrip() == text[:s.offsets[ends[i], 1]].rstrip()


def test_aligners_fitted_on_real_tokenizers_keep_distributions_normalised(registry, two_tokenizers):
    source_tok, pivot_tok = two_tokenizers
    mined = load(registry, "mined")().fit(source_tok, pivot_tok)
    statistical = load(registry, "statistical")().fit(source_tok, pivot_tok, TINY_CORPUS)
    source_vocab, pivot_vocab = Vocabulary.of(source_tok), Vocabulary.of(pivot_tok)
    same = [i for i in source_vocab.ordinary_ids if source_vocab.surfaces[i] in set(pivot_vocab.surfaces)]
    assert len(same) > 20
    for i in same:  # an identical surface is always the mined choice
        assert pivot_vocab.surfaces[mined.token_map[i]] == source_vocab.surfaces[i]
    assert mined.token_map[source_tok.eos_token_id] == pivot_tok.eos_token_id
    assert np.all(mined.token_map[source_vocab.ordinary_ids] >= 0)
    # statistical: word tokens seen in the corpus map to the pivot token starting at the same character
    seen = np.flatnonzero(statistical.observed)
    assert seen.size > 50
    agree = np.mean([pivot_vocab.surfaces[statistical.token_map[i]] == source_vocab.surfaces[i]
                     for i in seen if source_vocab.surfaces[i] in set(pivot_vocab.surfaces)])
    assert agree > 0.5
    rng = np.random.default_rng(0)
    s, p = tokenize_many(source_tok, SENTENCES[:1])[0], tokenize_many(pivot_tok, SENTENCES[:1])[0]
    alignment = align_many([p], [s])[0]
    ids = rng.integers(0, len(source_tok), size=(len(s), 5))
    logits = rng.standard_normal((len(s), 5))
    logprobs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    for aligner in (mined, statistical):
        out_ids, out_lp = aligner.align_distributions(alignment, ids, logprobs)
        rows = alignment.pivot_to_source() >= 0
        np.testing.assert_allclose(np.exp(out_lp[rows]).sum(1), 1.0, rtol=1e-9)
        assert np.all(out_ids[~rows] == -1)
        assert out_ids.max() < len(pivot_tok)


class SlowView:
    """A tokenizer that gives no offsets (as a slow, pure-Python tokenizer): delegates to a fast one."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast
        self.eos_token, self.bos_token = fast.eos_token, fast.bos_token

    def __len__(self):
        return len(self.fast)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.fast(text, add_special_tokens=add_special_tokens)["input_ids"]}

    def get_vocab(self):
        return self.fast.get_vocab()

    def convert_ids_to_tokens(self, ids):
        return self.fast.convert_ids_to_tokens(ids)

    @property
    def all_special_tokens(self):
        return self.fast.all_special_tokens


def test_a_tokenizer_without_offsets_is_aligned_by_the_dynamic_programme(two_tokenizers):
    source_tok, pivot_tok = two_tokenizers
    text = "The quick brown fox"
    slow = tokenize_many(SlowView(source_tok), [text])[0]
    fast = tokenize_many(source_tok, [text])[0]
    assert slow.offsets is None and slow.ids.tolist() == fast.ids.tolist() and slow.scheme == "byte_level"
    pivot = tokenize_many(pivot_tok, [text])[0]
    by_dp, by_offsets = align_many([pivot], [slow])[0], align_many([pivot], [fast])[0]
    assert by_dp.method == "edit_distance" and by_offsets.method == "offsets"
    assert by_dp.agreement(by_offsets) > 0.5
