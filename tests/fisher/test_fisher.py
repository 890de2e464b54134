"""Fisher merging (arXiv:2111.09832) and the engine's statistics pass: the formula, the statistic, the cache."""
from __future__ import annotations

import pytest
import torch
import yaml
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.merging import TensorInputs
from mergeplug.plugins import Registry
from mergeplug.statistics import RECORD_FILE, TENSOR_FILE
from mergeplug.testing import make_tiny_model, train_tiny_tokenizer
from mergeplug_plugins.mergers.fisher.merger import FisherMerger, fisher_weighted_mean

PARAMS = {"samples": 1000, "max_length": 512, "epsilon": 1e-10, "label": "response"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher_zoo")
    tok = train_tiny_tokenizer(root / "tok")
    base = make_tiny_model(root / "base", "llama", seed=0, num_layers=1, hidden=16, tokenizer_folder=tok)
    ft1 = make_tiny_model(root / "ft1", base=base, seed=1, tokenizer_folder=tok)
    ft2 = make_tiny_model(root / "ft2", base=base, seed=2, tokenizer_folder=tok)
    return {"base": base, "ft1": ft1, "ft2": ft2}


def inputs_of(models, fishers, weights=(1.0, 1.0), epsilon=1e-10):
    return TensorInputs(name="w", base=None, models=models, parameters={**PARAMS, "epsilon": epsilon},
                        model_parameters=[{"weight": w} for w in weights], statistics=fishers, model_names=["a", "b"])


def test_registered_through_the_real_plugin_manager():
    assert Registry().get("merger", "fisher").load() is FisherMerger


def test_disjoint_fisher_support_recovers_each_models_own_values():
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    support = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    merged = FisherMerger(PARAMS).merge(inputs_of([a, b], [2.0 * support, 3.0 * (1 - support)]))
    assert_close(merged, torch.where(support.bool(), a, b))


def test_formula_with_weights_and_the_floor():
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 6.0, 9.0]])
    fa, fb = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[3.0, 0.0, 2.0]])
    merged = FisherMerger(PARAMS).merge(inputs_of([a, b], [fa, fb], weights=(2.0, 1.0), epsilon=1e-3))
    # Σ w F̂ θ / Σ w F̂ by hand: (2·1·1 + 1·3·3)/(2+3); both floored: (2·2 + 6)/3; (2·1e-3·3 + 2·9)/(2e-3 + 2)
    expected = torch.tensor([[11.0 / 5.0, 10.0 / 3.0, (0.006 + 18.0) / 2.002]])
    assert_close(merged, expected)


def test_no_fisher_falls_back_to_the_weighted_mean():
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 6.0, 9.0]])
    merger = FisherMerger(PARAMS)
    assert_close(merger.merge(inputs_of([a, b], [], weights=(3.0, 1.0))), torch.tensor([[1.5, 3.0, 4.5]]))
    assert_close(merger.merge(inputs_of([a, b], [torch.ones(1, 3), None])), torch.tensor([[2.0, 4.0, 6.0]]))
    assert_close(fisher_weighted_mean([a, b], [torch.zeros(1, 3)] * 2, [1.0, 1.0], 1e-10), (a + b) / 2)


def test_zero_weights_are_refused():
    a = torch.ones(2, 3)
    with pytest.raises(MergeplugError, match="positive sum"):
        FisherMerger(PARAMS).merge(inputs_of([a, a], [a, a], weights=(0.0, 0.0)))


def hand_fisher(model, samples, label="response"):
    """(1/n) Σ_s (∇ log p(y_s|x_s))², each sample's log-likelihood written out token by token."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ids, prompt_tokens in samples:
        model.zero_grad()
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        if label == "response":
            ll = sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(prompt_tokens, len(ids)))
        else:
            last = torch.log_softmax(logits[-1], -1)
            ll = last[int(last.argmax())]
        ll.backward()
        for n, p in model.named_parameters():
            total[n] += p.grad ** 2
    return {n: t / len(samples) for n, t in total.items()}


@pytest.mark.parametrize("label", ["response", "argmax_last"])
def test_statistic_of_a_tiny_model_equals_the_hand_computation(tiny, label):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny["ft1"]), dtype=torch.float32).eval()
    samples = [([2, 10, 11, 12, 13, 3], 3), ([2, 20, 21, 22, 3], 2)]
    batches = []
    for ids, prompt_tokens in samples:
        labels = torch.tensor([ids])
        labels[:, :prompt_tokens] = -100
        batches.append({"input_ids": torch.tensor([ids]), "labels": labels})
    got = FisherMerger({**PARAMS, "label": label}).compute_statistic(model, batches, {"label": label})
    expected = hand_fisher(model, samples, label)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert_close(got[name], expected[name], rtol=1e-4, atol=1e-12)
    assert any(float(t.abs().sum()) > 0 for t in got.values())


def test_padded_batches_give_the_per_sample_fisher(tiny):
    from transformers import AutoModelForCausalLM

    from mergeplug.engine import statistic_batches

    model = AutoModelForCausalLM.from_pretrained(str(tiny["ft1"]), dtype=torch.float32).eval()
    samples = [([2, 10, 11, 12, 13, 3], 3), ([2, 20, 21, 22, 3], 2), ([2, 30, 3], 1)]
    padded = statistic_batches([{"input_ids": ids, "prompt_tokens": p} for ids, p in samples], "cpu", batch_tokens=64)
    assert len(padded) == 1 and padded[0]["input_ids"].shape == (3, 6)
    got = FisherMerger(PARAMS).compute_statistic(model, padded, {"label": "response"})
    expected = hand_fisher(model, samples, "response")
    for name in expected:
        assert_close(got[name], expected[name], rtol=1e-4, atol=1e-12)


def recipe(tmp_path, tiny, models):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"kind": "merge", "method": "fisher",
                                    "parameters": {"samples": 2, "max_length": 400}, "models": models}))
    return path


def test_merge_with_domains_computes_once_then_reuses_the_cache(tiny, statistics_cache, tmp_path, monkeypatch):
    from mergeplug.checkpoint import open_checkpoint
    from mergeplug.engine import merge

    calls = []
    original = FisherMerger.compute_statistic

    def counted(self, model, batches, settings):
        calls.append(sum(b["input_ids"].shape[0] for b in batches))  # samples
        return original(self, model, batches, settings)

    monkeypatch.setattr(FisherMerger, "compute_statistic", counted)
    path = recipe(tmp_path, tiny, [{"model": str(tiny["ft1"]), "domain": "math"},
                                   {"model": str(tiny["ft2"]), "domain": "math"}])
    out = merge(path, tmp_path / "out")
    assert calls == [2, 2]
    assert len([p for p in statistics_cache.iterdir() if not p.name.startswith(".")]) == 2
    merge(path, tmp_path / "out", force=True)
    assert calls == [2, 2]  # the second merge ran no forward pass

    # The merged tensor is the Fisher-weighted mean of the cached Fishers.
    from mergeplug.statistics import StatisticsCache
    name = "model.layers.0.mlp.down_proj.weight"
    entries = sorted(StatisticsCache().root.iterdir(), key=lambda p: p.name)
    stored = [StatisticsCache().get(e.name) for e in entries if not e.name.startswith(".")]
    by_model = {s.meta["model"]: s.get(name) for s in stored}
    thetas = [open_checkpoint(tiny[k], label=k).get(name) for k in ("ft1", "ft2")]
    expected = fisher_weighted_mean(thetas, [by_model[str(tiny["ft1"])], by_model[str(tiny["ft2"])]], [1.0, 1.0], 1e-10)
    assert_close(open_checkpoint(out, label="out").get(name), expected)


def test_a_corrupt_cache_entry_is_recomputed(tiny, statistics_cache, tmp_path, monkeypatch):
    from mergeplug.engine import merge

    calls = []
    original = FisherMerger.compute_statistic
    monkeypatch.setattr(FisherMerger, "compute_statistic",
                        lambda self, *a: (calls.append(1), original(self, *a))[1])
    path = recipe(tmp_path, tiny, [{"model": str(tiny["ft1"]), "domain": "math"},
                                   {"model": str(tiny["ft2"]), "domain": "math"}])
    merge(path, tmp_path / "out")
    entry = next(p for p in statistics_cache.iterdir() if (p / RECORD_FILE).is_file())
    with open(entry / TENSOR_FILE, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    merge(path, tmp_path / "out", force=True)
    assert len(calls) == 3  # two computed, then only the damaged one again


def test_local_data_files_are_used_per_model(tiny, statistics_cache, tmp_path):
    from mergeplug.engine import merge

    data = tmp_path / "mine.jsonl"
    data.write_text('{"instruction": "Add 2 and 3.", "response": "5"}\n{"instruction": "Say hi.", "response": "hi"}\n')
    path = recipe(tmp_path, tiny, [{"model": str(tiny["ft1"]), "data": {"data_files": str(data)}},
                                   {"model": str(tiny["ft2"]), "domain": "math"}])
    merge(path, tmp_path / "out")
    records = [yaml.safe_load((p / RECORD_FILE).read_text()) for p in statistics_cache.iterdir() if (p / RECORD_FILE).is_file()]
    assert sorted(r["meta"]["model"] for r in records) == sorted([str(tiny["ft1"]), str(tiny["ft2"])])


def test_a_model_without_data_is_refused_before_any_weight_is_read(tiny, statistics_cache, tmp_path, monkeypatch):
    from mergeplug import checkpoint
    from mergeplug.engine import merge

    def no_weights(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(checkpoint.Checkpoint, "get", no_weights)
    path = recipe(tmp_path, tiny, [{"model": str(tiny["ft1"]), "domain": "math"}, {"model": str(tiny["ft2"])}])
    with pytest.raises(MergeplugError) as err:
        merge(path, tmp_path / "out")
    assert str(err.value) == (f"models[1] ({tiny['ft2']}): merger fisher needs data from each model: give `domain:` "
                              f"(e.g. math) or `data:` in the recipe")
    assert not (tmp_path / "out").exists()
