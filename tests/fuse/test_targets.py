"""Fused targets: which pivot positions get a source distribution (hand-made tokenisations), the fallbacks,
MinCE and the other fusion functions on hand-made numbers, and the targets built from the tiny models."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from mergeplug import MergeplugError
from mergeplug.alignment import ROLES, Tokenization, align
from mergeplug.fusion import (NO_LABEL, ONE_TO_MANY, PAIRED, UNPAIRED, FusionSettings, StoreSettings,
                              aligned_source, build_targets, fit_aligner, fuse_sequence, pair_positions,
                              record_distributions, sequence_cross_entropy, split_sequences)

BOS = 1 + ROLES.index("bos")
NEG = -np.inf


def tokens(text, pieces, bos=True):
    """A Tokenization of ``text`` cut into ``pieces`` (with a leading BOS of empty span when ``bos``)."""
    spans, at = [], 0
    for piece in pieces:
        assert text[at:at + len(piece)] == piece
        spans.append((at, at + len(piece)))
        at += len(piece)
    assert at == len(text)
    names = (["<s>"] if bos else []) + list(pieces)
    offsets = ([(0, 0)] if bos else []) + spans
    roles = ([BOS] if bos else []) + [0] * len(pieces)
    return Tokenization(text, names, np.array(offsets), np.arange(len(names)), np.array(roles))


def test_positions_are_paired_where_both_models_read_the_same_text():
    #           pivot:  <s> | ab    | c  d      source: <s> | a  b | cd
    alignment = align(tokens("abcd", ["ab", "c", "d"]), tokens("abcd", ["a", "b", "cd"]))
    source_at, kinds = pair_positions(alignment)
    # 0 (<s>) predicts "ab", which the source cuts in two: one-to-many. 1 ("ab") ends where the source's "b"
    # ends and predicts "c", whose group holds the one source token "cd": paired with source position 2.
    # 2 ("c") ends inside the source's "cd": unpaired. 3 is the last token: nothing to predict.
    assert kinds.tolist() == [ONE_TO_MANY, PAIRED, UNPAIRED, NO_LABEL]
    assert source_at.tolist() == [-1, 2, -1, -1]


def test_one_to_one_tokens_pair_position_by_position_and_a_missing_bos_leaves_the_first_unpaired():
    same = pair_positions(align(tokens("xyz", ["x", "y", "z"]), tokens("xyz", ["x", "y", "z"])))
    assert same[1].tolist() == [PAIRED, PAIRED, PAIRED, NO_LABEL] and same[0].tolist() == [0, 1, 2, -1]
    no_bos = pair_positions(align(tokens("xyz", ["x", "y", "z"]), tokens("xyz", ["x", "y", "z"], bos=False)))
    assert no_bos[1].tolist() == [UNPAIRED, PAIRED, PAIRED, NO_LABEL] and no_bos[0].tolist() == [-1, 0, 1, -1]


def hand_made(settings):
    alignment = align(tokens("abcd", ["ab", "c", "d"]), tokens("abcd", ["a", "b", "cd"]))
    pivot_ids = np.array([10, 11, 12, 13])
    topk = (np.array([[11, 20], [12, 21], [13, 22], [14, 23]]), np.log([[.6, .2], [.5, .3], [.7, .1], [.4, .4]]))
    mapped = (np.array([[12, 5]]), np.log([[.75, .25]]))
    return aligned_source(alignment, pivot_ids, topk, mapped, settings)


def test_the_source_candidate_takes_the_mapped_distribution_and_the_fallbacks():
    ids, lp, kinds = hand_made(FusionSettings())  # FuseChat's: one-to-many -> gold, unpaired -> pivot's own
    assert kinds.tolist() == [ONE_TO_MANY, PAIRED, UNPAIRED, NO_LABEL]
    assert ids.tolist() == [[11, -1], [12, 5], [13, 22], [-1, -1]]
    np.testing.assert_allclose(np.exp(lp[:3]), [[1, 0], [.75, .25], [.7, .1]])
    assert np.isneginf(lp[3]).all()
    ids, lp, _ = hand_made(FusionSettings(one_to_many="pivot", unpaired="gold"))
    assert ids.tolist() == [[11, 20], [12, 5], [13, -1], [-1, -1]]
    ids, _, _ = hand_made(FusionSettings(one_to_many="skip", unpaired="skip"))
    assert ids.tolist() == [[-1, -1], [12, 5], [-1, -1], [-1, -1]]


def test_a_paired_position_whose_mapping_lost_every_id_falls_back_as_unpaired():
    alignment = align(tokens("xy", ["x", "y"]), tokens("xy", ["x", "y"]))
    topk = (np.array([[7, 8], [9, 6], [5, 4]]), np.log([[.5, .5], [.5, .5], [.5, .5]]))
    mapped = (np.array([[-1, -1], [3, -1]]), np.array([[NEG, NEG], [0.0, NEG]]))
    ids, _, kinds = aligned_source(alignment, np.array([0, 1, 2]), topk, mapped, FusionSettings())
    assert kinds.tolist() == [UNPAIRED, PAIRED, NO_LABEL]
    assert ids.tolist() == [[7, 8], [3, -1], [-1, -1]]


P_IDS = np.array([[1, 2], [3, -1]])
P_LP = np.log([[.3, .1], [.5, 1]])  # not normalised: the top-k of a larger distribution
Q_IDS = np.array([[2, 4], [3, 5]])
Q_LP = np.log([[.6, .2], [.4, .4]])


def test_minimum_ce_takes_the_candidate_of_lower_cross_entropy_renormalised():
    ids, lp, weight = fuse_sequence(P_IDS, P_LP, Q_IDS, Q_LP, pivot_ce=2.0, source_ce=1.5)
    assert weight == 1.0 and ids.tolist() == Q_IDS.tolist()
    np.testing.assert_allclose(np.exp(lp), [[.75, .25], [.5, .5]])
    ids, lp, weight = fuse_sequence(P_IDS, P_LP, Q_IDS, Q_LP, pivot_ce=1.5, source_ce=2.0)
    assert weight == 0.0 and ids.tolist() == P_IDS.tolist()
    np.testing.assert_allclose(np.exp(lp), [[.75, .25], [1, 0]])
    assert fuse_sequence(P_IDS, P_LP, Q_IDS, Q_LP, pivot_ce=1.0, source_ce=1.0)[2] == 0.0  # a tie keeps the pivot's


def test_avg_mixes_the_candidates_with_softmax_of_exp_minus_ce_weights():
    w_q = 1 / (1 + math.exp(math.exp(-2.0) - math.exp(-1.0)))  # softmax(exp(-CE_P), exp(-CE_Q)), CE 2 and 1
    w_p = 1 - w_q
    ids, lp, weight = fuse_sequence(P_IDS, P_LP, Q_IDS, Q_LP, pivot_ce=2.0, source_ce=1.0, function="avg")
    assert weight == pytest.approx(w_q)
    got = [{int(i): math.exp(v) for i, v in zip(r_ids, r_lp) if i >= 0} for r_ids, r_lp in zip(ids, lp)]
    expected = [{1: .75 * w_p, 2: .25 * w_p + .75 * w_q, 4: .25 * w_q}, {3: w_p + .5 * w_q, 5: .5 * w_q}]
    for row, want in zip(got, expected):
        assert row.keys() == want.keys()
        for key in want:
            assert row[key] == pytest.approx(want[key])
    assert ids.shape == (2, 4)


def test_source_always_takes_the_source_and_unknown_functions_are_refused():
    ids, _, weight = fuse_sequence(P_IDS, P_LP, Q_IDS, Q_LP, pivot_ce=0.1, source_ce=9.0, function="source")
    assert weight == 1.0 and ids.tolist() == Q_IDS.tolist()
    with pytest.raises(MergeplugError, match="fusion.function: 'max'"):
        fuse_sequence(P_IDS, P_LP, Q_IDS, Q_LP, pivot_ce=1.0, source_ce=1.0, function="max")
    with pytest.raises(MergeplugError, match="fusion.unpaired: 'zero'"):
        FusionSettings(unpaired="zero").check()


def test_cross_entropy_per_token_or_per_character():
    assert sequence_cross_entropy(6.0, 4, 12, "token") == 2.0  # 3 predicted tokens
    assert sequence_cross_entropy(6.0, 4, 12, "character") == 0.5
    assert sequence_cross_entropy(0.0, 1, 0, "token") == math.inf  # nothing predicted: never chosen


@pytest.fixture(scope="module")
def built(models, kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    texts = kit.count_train[:8] + kit.spell_train[:8] + kit.general[:4]
    settings = StoreSettings(top_k=4, shard_sequences=7)
    pivot = record_distributions(models.pivot, texts, root / "pivot", settings=settings, progress=False)
    source = record_distributions(models.speller, texts, root / "speller", settings=settings, progress=False)
    pivot_tok = AutoTokenizer.from_pretrained(str(models.pivot))
    source_tok = AutoTokenizer.from_pretrained(str(models.speller))
    aligner = fit_aligner("mined", {}, source_tok, pivot_tok)
    targets = build_targets(pivot, source, aligner, pivot_tok, source_tok, texts, root / "targets", progress=False)
    return pivot, source, aligner, targets


def test_mapped_source_distributions_sum_to_one(built):
    _, source, aligner, _ = built
    shard = source.shard(0)
    ids, lp = aligner.map_distribution(shard["topk_ids"].astype(np.int64), shard["topk_logprobs"].astype(np.float32))
    kept = (ids >= 0).any(axis=1)
    assert kept.all()
    np.testing.assert_allclose(np.exp(np.where(ids >= 0, lp, -np.inf)).sum(axis=1), 1.0, rtol=1e-5)


def test_every_target_row_is_a_distribution_and_minimum_ce_follows_the_stores(built):
    pivot, source, _, targets = built
    m = targets.manifest
    assert m["positions"] == pivot.tokens - pivot.sequences
    assert m["paired"] + m["one_to_many"] + m["unpaired"] == m["positions"] and m["paired"] > m["positions"] / 2
    chosen = 0
    for index in range(targets.shard_count):
        p, s, t = pivot.shard(index), source.shard(index), targets.shard(index)
        assert t["sequence_index"].tolist() == p["sequence_index"].tolist()
        for i, rows in enumerate(split_sequences(p)):
            ids = t["target_ids"][rows].astype(np.int64)
            probs = np.exp(np.where(ids >= 0, t["target_logprobs"][rows].astype(np.float64), -np.inf)).sum(axis=1)
            labelled = t["kinds"][rows] != NO_LABEL
            np.testing.assert_allclose(probs[labelled], 1.0, atol=3e-3)  # float16 storage
            assert (ids[~labelled] == -1).all()
            ce_p = p["nll"][i] / (p["lengths"][i] - 1)
            ce_s = s["nll"][i] / (s["lengths"][i] - 1)
            assert t["source_weight"][i] == (1.0 if ce_s < ce_p else 0.0)
            chosen += t["source_weight"][i]
            if ce_s >= ce_p:  # the pivot's own top-k, renormalised
                assert ids[labelled, :4].tolist() == p["topk_ids"][rows][labelled].tolist()
    assert m["source_chosen"] == chosen and 0 < chosen < m["sequences"]  # the speller wins its own lines only


def test_stores_of_different_corpora_are_refused(built, models, tmp_path):
    pivot, _, aligner, _ = built
    other = record_distributions(models.speller, ["spell: a b c"], tmp_path / "other",
                                 settings=StoreSettings(top_k=4, shard_sequences=7), progress=False)
    tok = AutoTokenizer.from_pretrained(str(models.pivot))
    with pytest.raises(MergeplugError, match="stores of different corpus"):
        build_targets(pivot, other, aligner, tok, tok, ["spell: a b c"], tmp_path / "t", progress=False)


def test_a_store_without_offsets_is_aligned_by_the_dynamic_programme(built, models, kit, tmp_path):
    """A source whose tokenizer gave no offsets (stored as -1) still gets targets: FuseLLM's edit-distance DP
    pairs its positions, mostly as the offsets do on these short lines."""
    import shutil

    from safetensors.numpy import load_file, save_file

    pivot, source, aligner, with_offsets = built
    blind = tmp_path / "blind"
    shutil.copytree(source.folder, blind)
    manifest = json.loads((blind / "manifest.json").read_text())
    for record in manifest["shards"].values():
        path = blind / record["file"]
        arrays = load_file(str(path))
        arrays["offsets"] = np.full_like(arrays["offsets"], -1)
        save_file(arrays, str(path))
        record["bytes"] = path.stat().st_size
    (blind / "manifest.json").write_text(json.dumps(manifest))
    from mergeplug.fusion import DistributionStore

    texts = kit.count_train[:8] + kit.spell_train[:8] + kit.general[:4]
    pivot_tok = AutoTokenizer.from_pretrained(str(models.pivot))
    source_tok = AutoTokenizer.from_pretrained(str(models.speller))
    targets = build_targets(pivot, DistributionStore(blind), aligner, pivot_tok, source_tok, texts,
                            tmp_path / "targets", progress=False)
    dp, exact = targets.manifest, with_offsets.manifest
    assert dp["positions"] == exact["positions"]
    assert dp["paired"] > 0.8 * exact["paired"]
    agree = np.mean([np.array_equal(a["kinds"], b["kinds"]) for a, b in zip(targets.shards(), with_offsets.shards())])
    assert agree > 0  # the DP drifts on some lines (whitespace, split punctuation), not on every one


def test_avg_targets_mix_both_candidates(built, models, kit, tmp_path):
    pivot, source, aligner, _ = built
    texts = kit.count_train[:8] + kit.spell_train[:8] + kit.general[:4]
    pivot_tok = AutoTokenizer.from_pretrained(str(models.pivot))
    source_tok = AutoTokenizer.from_pretrained(str(models.speller))
    targets = build_targets(pivot, source, aligner, pivot_tok, source_tok, texts, tmp_path / "avg",
                            settings=FusionSettings(function="avg"), progress=False)
    shard = targets.shard(0)
    assert shard["target_ids"].shape[1] == 8  # up to k ids from each candidate
    weights = shard["source_weight"]
    assert ((weights > 0) & (weights < 1)).all()
    labelled = shard["kinds"] != NO_LABEL
    ids = shard["target_ids"][labelled]
    probs = np.exp(np.where(ids >= 0, shard["target_logprobs"][labelled].astype(np.float64), -np.inf)).sum(axis=1)
    np.testing.assert_allclose(probs, 1.0, atol=5e-3)
