"""The distribution store: exactly the real positions, the model's own top-k, the gold log-loss, shards written
atomically and resumed, and its size per token."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeplug import MergeplugError, fusion
from mergeplug.fusion import DistributionStore, StoreSettings, record_distributions, sequence_order, split_sequences

from mergeplug.testing import TINY_CORPUS

TEXTS = [TINY_CORPUS[0], "count: 11 12 13 14 15 16", "spell: a b c d e", TINY_CORPUS[3], "count: 19 20 21 22 23 24",
         "hi", "spell: k l m n o p"]


@pytest.fixture(scope="module")
def exact_store(models, tmp_path_factory):
    """The pivot's store in float32, three texts a shard (so three shards), batches of two."""
    folder = tmp_path_factory.mktemp("store") / "pivot"
    settings = StoreSettings(top_k=5, shard_sequences=3, logprob_dtype="float32")
    return record_distributions(models.pivot, TEXTS, folder, settings=settings, batch_size=2, progress=False)


def by_row(store: DistributionStore) -> dict[int, dict[str, np.ndarray]]:
    """Each corpus row's arrays, from every shard."""
    rows = {}
    for shard in store.shards():
        for i, (row, span) in enumerate(zip(shard["sequence_index"].tolist(), split_sequences(shard))):
            rows[row] = {"input_ids": shard["input_ids"][span], "offsets": shard["offsets"][span],
                         "topk_ids": shard["topk_ids"][span], "topk_logprobs": shard["topk_logprobs"][span],
                         "nll": shard["nll"][i], "characters": shard["characters"][i]}
    return rows


def test_the_store_holds_exactly_the_real_positions(models, exact_store):
    tokenizer = AutoTokenizer.from_pretrained(str(models.pivot))
    lengths = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    assert exact_store.tokens == sum(lengths) and exact_store.sequences == len(TEXTS)
    rows = by_row(exact_store)
    assert sorted(rows) == list(range(len(TEXTS)))
    for row, text in enumerate(TEXTS):
        encoded = tokenizer(text, return_offsets_mapping=True)
        assert rows[row]["input_ids"].tolist() == encoded["input_ids"]
        assert rows[row]["offsets"].tolist() == [list(span) for span in encoded["offset_mapping"]]
        assert rows[row]["topk_ids"].shape == (lengths[row], 5)


def test_shards_follow_the_text_length_order(exact_store):
    order = sequence_order(TEXTS)
    assert exact_store.shard_count == 3
    stored = [row for shard in exact_store.shards() for row in shard["sequence_index"].tolist()]
    assert stored == order
    assert [len(TEXTS[i]) for i in order] == sorted((len(t) for t in TEXTS), reverse=True)


def test_the_top_k_is_torch_topk_of_the_models_log_softmax(models, exact_store):
    tokenizer = AutoTokenizer.from_pretrained(str(models.pivot))
    model = AutoModelForCausalLM.from_pretrained(str(models.pivot)).eval()
    rows = by_row(exact_store)
    for row, text in enumerate(TEXTS):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        values, indices = torch.topk(logp, 5, dim=-1)
        assert rows[row]["topk_ids"].tolist() == indices.tolist()
        torch.testing.assert_close(torch.from_numpy(rows[row]["topk_logprobs"]), values, atol=1e-5, rtol=1e-5)
        gold = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
        assert rows[row]["nll"] == pytest.approx(-float(gold.sum()), abs=1e-4)
        spans = tokenizer(text, return_offsets_mapping=True)["offset_mapping"][1:]
        assert rows[row]["characters"] == (max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0)


def test_float16_log_probabilities_stay_within_float16_rounding(models, exact_store, tmp_path):
    half = record_distributions(models.pivot, TEXTS, tmp_path / "half",
                                settings=StoreSettings(top_k=5, shard_sequences=3), progress=False)
    exact, rounded = by_row(exact_store), by_row(half)
    for row in exact:
        assert rounded[row]["topk_logprobs"].dtype == np.float16
        assert rounded[row]["topk_ids"].tolist() == exact[row]["topk_ids"].tolist()
        np.testing.assert_allclose(rounded[row]["topk_logprobs"].astype(np.float64),
                                   exact[row]["topk_logprobs"], rtol=1e-3, atol=1e-3)


def test_a_rerun_recomputes_only_a_removed_shard(models, tmp_path, monkeypatch):
    settings = StoreSettings(top_k=3, shard_sequences=3)
    folder = tmp_path / "store"
    first = record_distributions(models.pivot, TEXTS, folder, settings=settings, progress=False)
    before = {name: (folder / name).read_bytes() for name in ("shard-00000.safetensors", "shard-00002.safetensors")}
    removed = first.shard(1)
    (folder / "shard-00001.safetensors").unlink()
    with pytest.raises(MergeplugError, match="missing or truncated"):
        first.shard(1)
    computed = []
    original = fusion._record_shard

    def counting(lm, where, tokenizer, texts, rows, *args):
        computed.append(list(rows))
        return original(lm, where, tokenizer, texts, rows, *args)

    monkeypatch.setattr(fusion, "_record_shard", counting)
    again = record_distributions(models.pivot, TEXTS, folder, settings=settings, progress=False)
    assert computed == [sequence_order(TEXTS)[3:6]]
    recomputed = again.shard(1)
    assert sorted(recomputed) == sorted(removed)
    for key in removed:
        np.testing.assert_array_equal(recomputed[key], removed[key])
    assert all((folder / name).read_bytes() == data for name, data in before.items())  # untouched
    assert again.tokens == first.tokens and again.manifest["complete"]
    # A shard whose bytes changed is caught by its checksum and computed again too.
    path = folder / "shard-00002.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    computed.clear()
    record_distributions(models.pivot, TEXTS, folder, settings=settings, progress=False)
    assert computed == [sequence_order(TEXTS)[6:]]


def test_no_temporary_file_is_left_and_the_manifest_records_each_shard(exact_store):
    manifest = json.loads((exact_store.folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["identity"]["top_k"] == 5
    assert sorted(p.name for p in exact_store.folder.iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert [manifest["shards"][str(i)]["sequences"] for i in range(3)] == [3, 3, 1]


def test_a_folder_made_with_other_settings_is_refused(models, exact_store):
    with pytest.raises(MergeplugError, match="other settings \\(top_k\\)"):
        record_distributions(models.pivot, TEXTS, exact_store.folder,
                             settings=StoreSettings(top_k=4, shard_sequences=3, logprob_dtype="float32"),
                             progress=False)


def test_bad_settings_are_one_line_errors(models, tmp_path):
    with pytest.raises(MergeplugError, match="top_k: 0"):
        record_distributions(models.pivot, TEXTS, tmp_path / "a", settings=StoreSettings(top_k=0), progress=False)
    with pytest.raises(MergeplugError, match="top_k: 5000 is more than the model's 100 vocabulary entries"):
        record_distributions(models.pivot, TEXTS, tmp_path / "b", settings=StoreSettings(top_k=5000),
                             progress=False)


def test_bytes_per_token_is_ids_offsets_and_k_pairs(exact_store, models, tmp_path):
    half = record_distributions(models.pivot, TEXTS, tmp_path / "half", settings=StoreSettings(top_k=10),
                                progress=False)
    arrays = half.tokens * (4 + 8 + 10 * (4 + 2)) + half.sequences * (8 + 4 + 8 + 4)
    assert arrays < half.nbytes < arrays + 2048 * half.shard_count  # plus each shard's small JSON header
    assert half.bytes_per_token == half.nbytes / half.tokens


def test_the_corpus_is_read_from_a_column_relative_to_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    rows = [{"body": {"text": "first"}}, {"body": {"text": "  "}}, {"body": {"text": "second"}}]
    (tmp_path / "data" / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path / "data")
    with pytest.warns(UserWarning, match="dropped 1 empty text"):
        texts = fusion.read_corpus({"data_files": "data/c.jsonl", "column": "body.text"}, relative_to=tmp_path)
    assert texts == ["first", "second"]
    with pytest.raises(MergeplugError, match="row 0: column 'body' holds a dict, not a text"):
        fusion.read_corpus({"data_files": str(tmp_path / "data" / "c.jsonl"), "column": "body"})
    with pytest.raises(MergeplugError, match="corpus: give data_files"):
        fusion.read_corpus({"split": "train"})
