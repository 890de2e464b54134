"""RegMean (arXiv:2212.09849): the solve, the Gram statistic, and a full engine merge on its own domain data."""
from __future__ import annotations

import pytest
import torch
import yaml
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.merging import TensorInputs, samples_of
from mergeplug.plugins import Registry
from mergeplug.testing import make_tiny_model, train_tiny_tokenizer
from mergeplug_plugins.mergers.regmean.merger import RegMeanMerger, gram_layers, regmean_solve

PARAMS = {"alpha": 0.5, "samples": 1000, "max_length": 512}


def inputs_of(models, grams, alpha=0.5, weights=None):
    weights = weights or [1.0] * len(models)
    return TensorInputs(name="w", base=None, models=models, parameters={**PARAMS, "alpha": alpha},
                        model_parameters=[{"weight": w} for w in weights], statistics=grams,
                        model_names=[f"m{i}" for i in range(len(models))])


def test_registered_through_the_real_plugin_manager():
    assert Registry().get("merger", "regmean").load() is RegMeanMerger


def test_alpha_one_is_the_least_squares_solution_of_the_stacked_system():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 3, generator=gen, dtype=torch.float64) for _ in range(2)]  # tokens × in
    ws = [torch.randn(2, 3, generator=gen, dtype=torch.float64) for _ in range(2)]  # out × in
    grams = [x.T @ x / x.shape[0] for x in xs]
    merged = RegMeanMerger(PARAMS).merge(inputs_of(ws, grams, alpha=1.0))
    # min_W Σ_i ||X_i Wᵀ − X_i W_iᵀ||², each X_i scaled by 1/sqrt(n_i) like its Gram: one stacked least squares.
    a = torch.cat([x / x.shape[0] ** 0.5 for x in xs])
    b = torch.cat([x @ w.T / x.shape[0] ** 0.5 for x, w in zip(xs, ws)])
    expected = torch.linalg.lstsq(a, b).solution.T
    assert_close(merged, expected)
    assert merged.shape == (2, 3) and merged.dtype == torch.float64


def test_alpha_zero_is_the_per_input_feature_gram_diagonal_weighted_mean():
    w1 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w2 = torch.tensor([[3.0, 0.0, -3.0], [0.0, 1.0, 2.0]])
    g1 = torch.tensor([[1.0, 9.0, 9.0], [9.0, 2.0, 9.0], [9.0, 9.0, 3.0]])
    g2 = torch.tensor([[3.0, -5.0, 0.0], [-5.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    merged = RegMeanMerger(PARAMS).merge(inputs_of([w1, w2], [g1, g2], alpha=0.0))
    # Column j: (G1[jj] W1[:, j] + G2[jj] W2[:, j]) / (G1[jj] + G2[jj]); diagonals (1, 2, 3) and (3, 2, 1).
    expected = torch.tensor([[(1 * 1 + 3 * 3) / 4, (2 * 2 + 2 * 0) / 4, (3 * 3 + 1 * -3) / 4],
                             [(1 * 4 + 3 * 0) / 4, (2 * 5 + 2 * 1) / 4, (3 * 6 + 1 * 2) / 4]])
    assert_close(merged, expected)


def test_half_alpha_and_model_weights_match_the_formula_written_out():
    w1, w2 = torch.tensor([[1.0, 2.0], [0.0, 1.0], [2.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0], [-1.0, 3.0]])
    g1, g2 = torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([[1.0, -0.5], [-0.5, 4.0]])
    merged = RegMeanMerger(PARAMS).merge(inputs_of([w1, w2], [g1, g2], alpha=0.5, weights=[2.0, 1.0]))
    r1, r2 = torch.tensor([[2.0, 0.5], [0.5, 2.0]]), torch.tensor([[1.0, -0.25], [-0.25, 4.0]])
    expected = torch.linalg.inv(2 * r1 + r2) @ (2 * r1 @ w1.T + r2 @ w2.T)
    assert_close(merged, expected.T)


def test_identical_models_give_themselves_back_and_a_singular_gram_gives_the_mean_column():
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 4.0]])
    g = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])  # feature 2 never excited: singular
    assert_close(RegMeanMerger(PARAMS).merge(inputs_of([w, w], [g, g])), w)
    w2 = torch.tensor([[3.0, -2.0, 1.0], [0.5, 0.0, 0.0]])
    merged = regmean_solve([w, w2], [g, g], [1.0, 1.0], 1.0)
    assert bool(torch.isfinite(merged).all())
    assert_close(merged[:, 2], (w[:, 2] + w2[:, 2]) / 2)  # no data on feature 2: the mean of its columns
    assert_close(merged[:, :2], ((w + w2) / 2)[:, :2])  # same Grams: the mean on the excited features too


def test_tensors_without_a_gram_get_the_weighted_mean_and_bad_inputs_are_refused():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 6.0, 9.0])
    merger = RegMeanMerger(PARAMS)
    assert_close(merger.merge(inputs_of([a, b], [], weights=[3.0, 1.0])), torch.tensor([1.5, 3.0, 4.5]))
    assert_close(merger.merge(inputs_of([a, b], [torch.eye(3), None])), torch.tensor([2.0, 4.0, 6.0]))
    with pytest.raises(MergeplugError, match="positive sum"):
        merger.merge(inputs_of([a, b], [], weights=[0.0, 0.0]))
    with pytest.raises(MergeplugError, match=r"Gram of shape \[2, 2\] for a weight of shape \[2, 3\]"):
        merger.merge(inputs_of([torch.ones(2, 3)] * 2, [torch.eye(2)] * 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean_zoo")
    tok = train_tiny_tokenizer(root / "tok")
    base = make_tiny_model(root / "base", "llama", seed=0, num_layers=1, hidden=16, tokenizer_folder=tok)
    ft1 = make_tiny_model(root / "ft1", base=base, seed=1, tokenizer_folder=tok)
    ft2 = make_tiny_model(root / "ft2", base=base, seed=2, tokenizer_folder=tok)
    return {"base": base, "ft1": ft1, "ft2": ft2}


def test_gram_of_a_tiny_model_equals_xtx_over_tokens_from_a_manual_hook(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny["ft1"]), dtype=torch.float32).eval()
    samples = [[2, 10, 11, 12, 13, 3], [2, 20, 21, 22, 3]]
    batches = [{"input_ids": torch.tensor([ids]), "labels": torch.tensor([ids])} for ids in samples]
    got = RegMeanMerger(PARAMS).compute_statistic(model, batches, {"samples": 2, "max_length": 512})

    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, []).append(args[0][0]))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    for h in handles:
        h.remove()
    expected = {f"{name}.weight": torch.cat(xs).T @ torch.cat(xs) / 11 for name, xs in seen.items()}  # 6 + 5 tokens
    assert sorted(got) == sorted(expected)
    assert "model.layers.0.mlp.down_proj.weight" in got and "lm_head.weight" in got  # llama: untied lm_head
    for name in expected:
        assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert got["model.layers.0.mlp.down_proj.weight"].shape == (model.config.intermediate_size,) * 2


def test_layers_fed_the_same_input_share_one_gram_computation(tiny, monkeypatch):
    """q/k/v take one tensor, gate/up another: per block 4 xᵀx products (qkv, o, gate/up, down), not 7."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny["ft1"]), dtype=torch.float32).eval()
    products = []
    real_addmm = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_",
                        lambda self, *a, **k: (products.append(1), real_addmm(self, *a, **k))[1])
    batches = [{"input_ids": torch.tensor([[2, 10, 11, 12, 3]])}, {"input_ids": torch.tensor([[2, 20, 3]])}]
    got = RegMeanMerger(PARAMS).compute_statistic(model, batches, {"samples": 2, "max_length": 512})
    blocks = model.config.num_hidden_layers
    assert len(products) == 2 * (4 * blocks + 1)  # + the untied lm_head, in each of the 2 batches
    q, k, v = (got[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(q, k) and torch.equal(q, v) and q.data_ptr() != k.data_ptr()
    assert not torch.equal(q, got["model.layers.0.self_attn.o_proj.weight"])


class _Switching(torch.nn.Module):
    """Two linears that take the same input in the first forward pass and different ones after."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.passes = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), 0

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None):
        x = input_ids.float().unsqueeze(-1).expand(*input_ids.shape, 4)
        self.passes += 1
        return self.a(x) + self.b(x if self.passes == 1 else x + 1)


def test_a_layer_that_stops_sharing_its_input_is_refused_not_given_a_wrong_gram():
    batches = [{"input_ids": torch.tensor([[1, 2]])}, {"input_ids": torch.tensor([[3, 4]])}]
    with pytest.raises(MergeplugError, match="b.weight shared its input with a.weight in one forward pass"):
        RegMeanMerger(PARAMS).compute_statistic(_Switching(), batches, {"samples": 2, "max_length": 512})


def test_statistic_batches_group_longest_first_and_pad_on_the_right():
    from mergeplug.engine import statistic_batches

    examples = [{"input_ids": [1, 2], "prompt_tokens": 1}, {"input_ids": [3, 4, 5, 6], "prompt_tokens": 2},
                {"input_ids": [7, 8, 9], "prompt_tokens": 1}, {"input_ids": [10], "prompt_tokens": 1}]
    batches = statistic_batches(examples, "cpu", batch_tokens=8, pad_id=0)
    # longest first: [4 tokens, 3 tokens] fill 2 x 4 = 8; then [2, 1] padded to 2
    assert [b["input_ids"].tolist() for b in batches] == [[[3, 4, 5, 6], [7, 8, 9, 0]], [[1, 2], [10, 0]]]
    assert [b["labels"].tolist() for b in batches] == [[[-100, -100, 5, 6], [-100, 8, 9, -100]],
                                                       [[-100, 2], [-100, -100]]]
    assert [b["attention_mask"].tolist() for b in batches] == [[[1, 1, 1, 1], [1, 1, 1, 0]], [[1, 1], [1, 0]]]
    # a row longer than the budget still gets a batch of its own
    assert [b["input_ids"].shape[0] for b in statistic_batches(examples, "cpu", batch_tokens=2)] == [1, 1, 1, 1]
    assert [s["input_ids"].tolist() for s in samples_of(batches)] == [[[3, 4, 5, 6]], [[7, 8, 9]], [[1, 2]], [[10]]]


def test_padded_batches_give_the_same_grams_as_one_sample_at_a_time(tiny):
    from transformers import AutoModelForCausalLM

    from mergeplug.engine import statistic_batches

    model = AutoModelForCausalLM.from_pretrained(str(tiny["ft1"]), dtype=torch.float32).eval()
    examples = [{"input_ids": ids, "prompt_tokens": 1} for ids in ([2, 10, 11, 12, 13, 3], [2, 20, 21, 22, 3], [2, 5])]
    merger = RegMeanMerger(PARAMS)
    single = merger.compute_statistic(model, statistic_batches(examples, "cpu", batch_tokens=1), {})
    padded = statistic_batches(examples, "cpu", batch_tokens=64)
    assert len(padded) == 1 and int(padded[0]["attention_mask"].sum()) == 13 < padded[0]["input_ids"].numel()
    together = merger.compute_statistic(model, padded, {})
    for name in single:
        assert_close(together[name], single[name], rtol=1e-5, atol=1e-6)


def test_a_tied_output_layer_gets_no_gram(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(tmp_path / "tied", "llama", seed=0, num_layers=1, hidden=16, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    names = set(gram_layers(model))
    assert "lm_head.weight" not in names and "model.layers.0.self_attn.q_proj.weight" in names


def write_recipe(tmp_path, tiny):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"kind": "merge", "method": "regmean",
                                    "parameters": {"samples": 2, "max_length": 400},
                                    "models": [{"model": str(tiny["ft1"]), "domain": "math"},
                                               {"model": str(tiny["ft2"]), "domain": "math"}]}))
    return path


def test_engine_computes_the_grams_once_on_math_then_reads_the_cache(tiny, statistics_cache, tmp_path, monkeypatch):
    from mergeplug.engine import compute_statistics, plan_merge
    from mergeplug.recipe import load_recipe

    calls = []
    original = RegMeanMerger.compute_statistic

    def counted(self, model, batches, settings):
        calls.append((sum(b["input_ids"].shape[0] for b in batches), dict(settings)))
        return original(self, model, batches, settings)

    monkeypatch.setattr(RegMeanMerger, "compute_statistic", counted)
    recipe = load_recipe(write_recipe(tmp_path, tiny), kind="merge")
    first = compute_statistics(plan_merge(recipe))
    assert calls == [(2, {"samples": 2, "max_length": 400})] * 2
    second = compute_statistics(plan_merge(recipe))
    assert len(calls) == 2  # the second run ran no forward pass
    assert len([p for p in statistics_cache.iterdir() if not p.name.startswith(".")]) == 2
    name = "model.layers.0.mlp.down_proj.weight"
    for a, b in zip(first, second):
        gram = b.get(name)
        assert_close(a.get(name), gram)
        assert gram.shape == (gram.shape[0], gram.shape[0])
        assert_close(gram, gram.T)
        assert bool((torch.diagonal(gram) >= 0).all())


def test_full_engine_merge_equals_regmean_of_the_cached_grams(tiny, statistics_cache, tmp_path):
    from mergeplug.checkpoint import open_checkpoint
    from mergeplug.engine import merge
    from mergeplug.statistics import StatisticsCache

    out = merge(write_recipe(tmp_path, tiny), tmp_path / "out")
    stored = [StatisticsCache().get(e.name) for e in sorted(StatisticsCache().root.iterdir(), key=lambda p: p.name)
              if not e.name.startswith(".")]
    grams = {s.meta["model"]: s for s in stored}
    merged = open_checkpoint(out, label="out")
    ckpts = [open_checkpoint(tiny[k], label=k) for k in ("ft1", "ft2")]
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        expected = regmean_solve([c.get(name) for c in ckpts],
                                 [grams[str(tiny[k])].get(name) for k in ("ft1", "ft2")], [1.0, 1.0], 0.5)
        assert_close(merged.get(name), expected)
    norm = "model.layers.0.input_layernorm.weight"
    assert_close(merged.get(norm), (ckpts[0].get(norm) + ckpts[1].get(norm)) / 2)


def test_statistics_use_the_first_rows_of_a_seed_42_shuffle(tiny, statistics_cache, tmp_path, monkeypatch):
    """MergeBench draws its statistics samples with dataset.shuffle(seed=42): the pass sees those rows, in that
    order, not the file's first ones."""
    import json

    from transformers import AutoTokenizer

    from mergeplug.data import shuffled_first
    from mergeplug.engine import compute_statistics, plan_merge
    from mergeplug.recipe import check_recipe

    rows = [{"instruction": f"question number {i}", "response": f"answer {i}"} for i in range(10)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    original = RegMeanMerger.compute_statistic

    def spy(self, model, batches, settings):
        seen.extend(batches)
        return original(self, model, batches, settings)

    monkeypatch.setattr(RegMeanMerger, "compute_statistic", spy)
    recipe = check_recipe({"method": "regmean", "parameters": {"samples": 3, "max_length": 400},
                           "models": [{"model": str(tiny["ft1"]), "data": {"data_files": str(data)}}]}, source="r")
    compute_statistics(plan_merge(recipe))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny["ft1"]))
    texts = [tokenizer.decode(b["input_ids"][0], skip_special_tokens=True).replace(" ", "")
             for b in samples_of(seen)]
    expected = [r["instruction"].replace(" ", "") for r in shuffled_first(rows, 3)]
    assert expected != [r["instruction"].replace(" ", "") for r in rows[:3]]  # the shuffle does move rows
    # Batched longest first, so compare as sets: each drawn row's text is one of the samples passed.
    assert len(texts) == 3 and all(any(e in t for t in texts) for e in expected)
    assert all(sum(e in t for e in expected) == 1 for t in texts)


def test_the_cli_batch_token_budget_reaches_the_statistics_pass(tiny, statistics_cache, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mergeplug.cli import cli

    shapes = []
    original = RegMeanMerger.compute_statistic

    def spy(self, model, batches, settings):
        shapes.extend(tuple(b["input_ids"].shape) for b in batches)
        return original(self, model, batches, settings)

    monkeypatch.setattr(RegMeanMerger, "compute_statistic", spy)
    path = write_recipe(tmp_path, tiny)
    result = CliRunner().invoke(cli, ["merge", str(path), "-o", str(tmp_path / "out"), "--statistics-batch-tokens", "1"])
    assert result.exit_code == 0, result.output
    assert len(shapes) == 4 and all(rows == 1 for rows, _ in shapes)  # 2 models x 2 samples, one row per batch
    result = CliRunner().invoke(cli, ["merge", str(path), "-o", str(tmp_path / "o2"), "--statistics-batch-tokens", "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output


def test_a_statistics_failure_leaves_no_temporary_folder(tiny, statistics_cache, tmp_path, monkeypatch):
    from mergeplug.engine import merge

    def broken(self, model, batches, settings):
        raise RuntimeError("boom")

    monkeypatch.setattr(RegMeanMerger, "compute_statistic", broken)
    with pytest.raises(MergeplugError, match=r"failed computing its statistic gram: RuntimeError: boom"):
        merge(write_recipe(tmp_path, tiny), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
