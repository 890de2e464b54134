"""Localize-and-Stitch with trained masks (arXiv:2408.13656): the mask gradient, training on a constructed
problem, the stitch, and a full `mergeplug merge` with the engine's base-aware statistics pass and its cache."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.merging import TensorInputs
from mergeplug.plugins import Registry
from mergeplug.testing import make_tiny_model, train_tiny_tokenizer
from mergeplug_plugins.mergers.localize_stitch_trained.merger import (
    TrainedLocalizeAndStitch,
    initial_logits,
    logits_step,
    response_loss,
    train_masks,
)

SETTINGS = {"samples": 2, "max_length": 64, "sparsity": 0.25, "sigmoid_bias": 3.0, "learning_rate": 1000.0,
            "epochs": 3, "l1_strength": 100.0, "gradient_reduction": "sum", "vocabulary": "base"}


class Bigram(torch.nn.Module):
    """One weight matrix W [vocab, vocab]: the logits after token a are the column W[:, a]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.weight.T[input_ids])


def batch(prompt: list[int], response: list[int]) -> dict:
    ids = torch.tensor([prompt + response])
    labels = ids.clone()
    labels[:, :len(prompt)] = -100
    return {"input_ids": ids, "labels": labels}


def test_registered_through_the_real_plugin_manager():
    cls = Registry().get("merger", "localize_stitch_trained").load()
    assert cls is TrainedLocalizeAndStitch
    assert cls.statistic_needs_base and cls.needs_base and cls.statistic_shape == "weight"


# --- the mask's gradient ------------------------------------------------------------------------------------
def test_gradient_wrt_the_mask_logits_is_the_chain_rule_through_the_interpolation():
    gen = torch.Generator().manual_seed(0)
    base, tau, logits = (torch.randn(4, 4, generator=gen) for _ in range(3))
    batches = [batch([0], [1, 2]), batch([3, 1], [0])]

    # Autograd through θ = base + σ(S) ⊙ τ, S the leaf.
    s = logits.clone().requires_grad_(True)
    theta = base + torch.sigmoid(s) * tau
    loss = sum(torch.nn.functional.cross_entropy(theta.T[b["input_ids"][0, :-1]][b["labels"][0, 1:] != -100],
                                                 b["labels"][0, 1:][b["labels"][0, 1:] != -100]) for b in batches)
    loss.backward()

    # By hand: ∂L/∂θ[:, a] = mean over the sample's response tokens of softmax(θ[:, a]) − e_y, then ⊙ τ ⊙ σ'(S).
    theta = (base + torch.sigmoid(logits) * tau).detach()
    by_hand = torch.zeros(4, 4)
    for a, ys in (([0, 1], [1, 2]), ([1], [0])):
        for prev, y in zip(a, ys):
            one_hot = torch.nn.functional.one_hot(torch.tensor(y), 4)
            by_hand[:, prev] += (torch.softmax(theta[:, prev], 0) - one_hot) / len(ys)
    sigma = torch.sigmoid(logits)
    expected = by_hand * tau * sigma * (1 - sigma)
    assert_close(s.grad, expected)

    # The plugin's pieces: its loss summed over the samples, then one step with lr 1 and no L1 term.
    model = Bigram(theta)
    for b in batches:
        response_loss(model, b)[0].backward()
    stepped = logits_step(logits.clone(), tau, model.weight.grad, learning_rate=1.0, l1_strength=0.0)
    assert_close(logits - stepped, expected)


def test_a_padded_batch_gives_the_sum_of_its_samples_gradients():
    from mergeplug.engine import statistic_batches

    theta = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    examples = [{"input_ids": [0, 1, 2, 3], "prompt_tokens": 2}, {"input_ids": [4, 1], "prompt_tokens": 1},
                {"input_ids": [2, 3, 4], "prompt_tokens": 3}]  # the last one has no response token: skipped
    one_by_one = Bigram(theta)
    for e in examples[:2]:
        response_loss(one_by_one, batch(e["input_ids"][:e["prompt_tokens"]], e["input_ids"][e["prompt_tokens"]:]))[0].backward()
    (padded,) = statistic_batches(examples, "cpu", batch_tokens=100)
    together = Bigram(theta)
    loss, used = response_loss(together, padded)
    loss.backward()
    assert used == 2 and padded["input_ids"].shape == (3, 4)
    assert_close(together.weight.grad, one_by_one.weight.grad)


def test_the_l1_step_shrinks_the_mask_by_lambda_times_the_sigmoid_derivative():
    logits = torch.tensor([-1.0, 0.0, 3.0])
    stepped = logits_step(logits.clone(), torch.ones(3), torch.zeros(3), learning_rate=1e8, l1_strength=2.0)
    sigma = torch.sigmoid(logits)
    assert_close(stepped, logits - 2.0 * sigma * (1 - sigma))
    assert_close(stepped[1], torch.tensor(-0.5))  # σ'(0) = 1/4


def test_initial_logits_take_the_top_fraction_over_the_whole_model_with_ties_kept():
    tvs = {"a": torch.tensor([1.0, -5.0, 3.0]), "b": torch.tensor([[-4.0, 2.0], [5.0, 0.0]])}
    got = initial_logits(tvs, 3 / 7, 2.0)  # k = 3: |5|, |−5|, |−4|
    assert_close(got["a"], torch.tensor([-2.0, 2.0, -2.0]))
    assert_close(got["b"], torch.tensor([[2.0, -2.0], [2.0, -2.0]]))
    tied = initial_logits(tvs, 1 / 7, 2.0)  # k = 1, but both entries of magnitude 5 are at the cut: both kept
    assert_close(tied["a"], torch.tensor([-2.0, 2.0, -2.0]))
    assert_close(tied["b"], torch.tensor([[-2.0, -2.0], [2.0, -2.0]]))
    assert all(bool((t < 0).all()) for t in initial_logits(tvs, 0.0, 2.0).values())
    assert all(bool((t > 0).all()) for t in initial_logits(tvs, 1.0, 2.0).values())


# --- training finds the entries that matter -----------------------------------------------------------------
def constructed_problem():
    """A bigram table trained on 0 → 1 and 1 → 2. Its task vector has useful entries (raise the right next
    token), harmful ones (raise a wrong one) and irrelevant ones (columns of tokens never read), the last two
    larger, so the initial top-magnitude mask holds exactly the wrong four."""
    tau = torch.zeros(4, 4)
    useful, harmful, irrelevant = [(1, 0), (2, 1)], [(3, 0), (0, 1)], [(0, 2), (1, 3)]
    for (r, c), v in zip(useful + harmful + irrelevant, [1.0, 1.0, 2.0, 2.0, 3.0, -3.0]):
        tau[r, c] = v
    base = torch.zeros(4, 4)
    batches = [batch([0], [1]), batch([1], [2])]
    as_mask = lambda cells: torch.zeros(4, 4, dtype=torch.bool).index_put_(  # noqa: E731
        tuple(torch.tensor(cells).T), torch.tensor(True))
    return base, tau, batches, as_mask(useful), as_mask(irrelevant), as_mask(harmful + irrelevant)


def test_training_keeps_the_entries_that_reduce_the_loss_and_drops_the_rest():
    base, tau, batches, useful, irrelevant, initial = constructed_problem()
    masks = train_masks(Bigram(base + tau), batches, {"weight": base}, SETTINGS)
    assert masks["weight"].dtype == torch.bool
    assert torch.equal(masks["weight"], useful)

    # Without the L1 term nothing moves the entries the loss never reaches: they keep their initial value.
    no_l1 = train_masks(Bigram(base + tau), batches, {"weight": base}, {**SETTINGS, "l1_strength": 0.0})
    assert torch.equal(no_l1["weight"], useful | irrelevant)
    # No epoch: the initial top-sparsity mask (the dataless form's).
    untrained = train_masks(Bigram(base + tau), batches, {"weight": base}, {**SETTINGS, "epochs": 0})
    assert torch.equal(untrained["weight"], initial)
    # The mean of the two samples' gradients with twice the learning rate is the same step.
    mean = train_masks(Bigram(base + tau), batches, {"weight": base},
                       {**SETTINGS, "gradient_reduction": "mean", "learning_rate": 2000.0})
    assert torch.equal(mean["weight"], useful)


def test_training_needs_a_response_token_and_a_matching_base():
    base, tau, batches, *_ = constructed_problem()
    with pytest.raises(MergeplugError, match="no sample has a response token within max_length"):
        train_masks(Bigram(base + tau), [batch([0, 1], [])], {"weight": base}, SETTINGS)
    with pytest.raises(MergeplugError, match=r"weight has shape \[4, 4\] in the model and \[4, 3\] in base_model"):
        train_masks(Bigram(base + tau), batches, {"weight": base[:, :3]}, SETTINGS)
    with pytest.raises(MergeplugError, match="base_model has no tensor weight"):
        train_masks(Bigram(base + tau), batches, {}, SETTINGS)


# --- the stitch ---------------------------------------------------------------------------------------------
def stitch_inputs(masks):
    base = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    models = [torch.tensor([[3.0, 5.0, 7.0], [0.0, 4.0, 6.0]]), torch.tensor([[1.0, 9.0, 0.0], [8.0, 0.0, 2.0]])]
    return TensorInputs(name="w", base=base, models=models, parameters={}, model_parameters=[{}, {}],
                        statistics=masks, model_names=["a", "b"])


def test_stitch_averages_overlaps_by_their_count_and_keeps_the_base_where_no_mask_covers():
    m1 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    m2 = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    merged = TrainedLocalizeAndStitch({}).merge(stitch_inputs([m1, m2]))
    # τ_a = [[2, 4, 6], [−2, 2, 4]], τ_b = [[0, 8, −1], [6, −2, 0]]; column 2 is covered by no mask.
    expected = torch.tensor([[1.0 + 2.0, 1.0 + (4.0 + 8.0) / 2, 1.0],
                             [2.0 + 6.0, 2.0 + (2.0 - 2.0) / 2, 2.0]])
    assert_close(merged, expected)


def test_stitch_without_masks_is_the_base_and_a_model_without_one_contributes_nothing():
    merger = TrainedLocalizeAndStitch({})
    inputs = stitch_inputs([])
    assert_close(merger.merge(inputs), inputs.base)
    assert_close(merger.merge(stitch_inputs([None, None])), inputs.base)
    only_b = merger.merge(stitch_inputs([None, torch.ones(2, 3)]))
    assert_close(only_b, stitch_inputs([]).models[1])
    message = r"w: models\[0\] \(a\): mask of shape \[3, 2\] for a weight of shape \[2, 3\]"
    with pytest.raises(MergeplugError, match=message):
        merger.merge(stitch_inputs([torch.ones(3, 2), None]))


# --- end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("localize_stitch_trained_zoo")
    tok = train_tiny_tokenizer(root / "tok")
    base = make_tiny_model(root / "base", "llama", seed=0, num_layers=1, hidden=16, tokenizer_folder=tok)
    return {
        "base": base,
        "ft1": make_tiny_model(root / "ft1", base=base, seed=1, tokenizer_folder=tok),
        "ft2": make_tiny_model(root / "ft2", base=base, seed=2, tokenizer_folder=tok),
        "base2": make_tiny_model(root / "base2", base=base, seed=3, noise=0.005, tokenizer_folder=tok),
    }


def write_recipe(tmp_path, base, models):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "kind": "merge", "method": "localize_stitch_trained", "base_model": str(base),
        "parameters": {"samples": 2, "max_length": 200, "epochs": 2, "learning_rate": 1.0e6, "sparsity": 0.3},
        "models": models,
    }))
    return path


def entries(cache):
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def test_merge_trains_masks_once_reuses_the_cache_and_recomputes_for_a_changed_base(tiny, statistics_cache, tmp_path,
                                                                                     monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    from mergeplug.cli import cli
    from mergeplug.statistics import StatisticsCache

    calls, forwards = [], []
    original_compute, original_forward = TrainedLocalizeAndStitch.compute_statistic, LlamaForCausalLM.forward

    def counted_compute(self, model, batches, settings, base=None):
        # The engine hands the base lazily, named like the model's parameters, float32.
        assert sorted(base) == sorted(name for name, _ in model.named_parameters())
        calls.append(sum(b["input_ids"].shape[0] for b in batches))  # samples
        return original_compute(self, model, batches, settings, base=base)

    def counted_forward(self, *args, **kwargs):
        forwards.append(1)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(TrainedLocalizeAndStitch, "compute_statistic", counted_compute)
    monkeypatch.setattr(LlamaForCausalLM, "forward", counted_forward)
    models = [{"model": str(tiny["ft1"]), "domain": "math"}, {"model": str(tiny["ft2"]), "domain": "coding"}]
    path, out = write_recipe(tmp_path, tiny["base"], models), tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    # both samples of a model in one padded batch: one forward per epoch
    assert calls == [2, 2] and len(forwards) == 2 * 2  # models × epochs
    assert len(entries(statistics_cache)) == 2

    # The merged model reloads; each tensor is the stitch of the cached masks; embeddings and lm_head are the base's.
    AutoModelForCausalLM.from_pretrained(str(out))
    merged, base = load_file(str(out / "model.safetensors")), load_file(str(tiny["base"] / "model.safetensors"))
    thetas = [load_file(str(tiny[k] / "model.safetensors")) for k in ("ft1", "ft2")]
    stored = {s.meta["model"]: s for s in (StatisticsCache().get(e.name) for e in entries(statistics_cache))}
    masks = [stored[str(tiny[k])] for k in ("ft1", "ft2")]
    assert all(s.meta["base"] == str(tiny["base"]) for s in masks)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.norm.weight"):
        m = [s.get(name).float() for s in masks]
        assert 0 < float(m[0].mean()) < 1
        numerator = m[0] * (thetas[0][name] - base[name]) + m[1] * (thetas[1][name] - base[name])
        expected = base[name] + numerator / (m[0] + m[1]).clamp_min(1)
        assert_close(merged[name], expected)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert name not in masks[0].names
        assert_close(merged[name], base[name])
    # Training moved the masks away from the initial top-30% of |τ| (the dataless form's).
    for theta, stored_mask in zip(thetas, masks):
        tvs = {name: theta[name] - base[name] for name in stored_mask.names}
        initial = initial_logits(tvs, 0.3, 3.0)
        flipped = sum(int((stored_mask.get(name) != (initial[name] > 0)).sum()) for name in tvs)
        assert flipped > 0

    # The same recipe again: nothing is trained, no forward pass runs.
    result = CliRunner().invoke(cli, ["merge", str(path), "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert calls == [2, 2] and len(forwards) == 4

    # Another base model changes every task vector: both masks are trained again, under new cache entries.
    path = write_recipe(tmp_path, tiny["base2"], models)
    result = CliRunner().invoke(cli, ["merge", str(path), "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert calls == [2, 2, 2, 2] and len(entries(statistics_cache)) == 4


def test_a_model_without_data_is_refused_before_any_weight_is_read(tiny, statistics_cache, tmp_path, monkeypatch):
    from mergeplug import checkpoint
    from mergeplug.engine import merge

    def no_weights(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(checkpoint.Checkpoint, "get", no_weights)
    path = write_recipe(tmp_path, tiny["base"], [{"model": str(tiny["ft1"]), "domain": "math"},
                                                 {"model": str(tiny["ft2"])}])
    with pytest.raises(MergeplugError) as err:
        merge(path, tmp_path / "out")
    assert str(err.value) == (f"models[1] ({tiny['ft2']}): merger localize_stitch_trained needs data from each model: "
                              f"give `domain:` (e.g. math) or `data:` in the recipe")
    assert not (tmp_path / "out").exists()


def test_vocabulary_base_holds_embeddings_at_the_base_and_masked_trains_them_too(tiny):
    from transformers import AutoModelForCausalLM

    from mergeplug_plugins.mergers.localize_stitch_trained.merger import vocabulary_parameters

    base = dict(AutoModelForCausalLM.from_pretrained(str(tiny["base"]), dtype=torch.float32).named_parameters())
    base = {name: p.detach() for name, p in base.items()}
    ids = torch.tensor([[2, 10, 11, 12, 20, 21, 3]])
    labels = ids.clone()
    labels[:, :4] = -100
    settings = {**SETTINGS, "learning_rate": 1e6, "epochs": 1, "l1_strength": 0.0}

    model = AutoModelForCausalLM.from_pretrained(str(tiny["ft1"]), dtype=torch.float32)
    assert vocabulary_parameters(model) == {"model.embed_tokens.weight", "lm_head.weight"}
    masks = train_masks(model, [{"input_ids": ids, "labels": labels}], base, settings)
    assert set(masks) == set(base) - {"model.embed_tokens.weight", "lm_head.weight"}
    params = dict(model.named_parameters())
    assert_close(params["model.embed_tokens.weight"].detach(), base["model.embed_tokens.weight"])
    assert not params["lm_head.weight"].requires_grad

    model = AutoModelForCausalLM.from_pretrained(str(tiny["ft1"]), dtype=torch.float32)
    masked = train_masks(model, [{"input_ids": ids, "labels": labels}], base, {**settings, "vocabulary": "masked"})
    assert set(masked) == set(base)
    assert masked["lm_head.weight"].shape == base["lm_head.weight"].shape
