"""localize_stitch, dataless (arXiv:2408.13656): top-|τ| masks per model, overlaps averaged by their count."""
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.merging import topk_mask
from mergeplug.schema import with_defaults

NAME = "localize_stitch"
BASE = torch.ones(2, 3)
TASK_VECTORS = [
    torch.tensor([[5.0, -4.0, 1.0], [0.0, 0.0, 0.5]]),
    torch.tensor([[3.0, 0.0, 0.0], [0.0, -6.0, 1.0]]),
]
MODELS = [BASE + tv for tv in TASK_VECTORS]


@pytest.fixture
def stitch(make_merger, make_inputs):
    """Merge {tensor name: (base, models)} in the engine's order: the pre-pass over every tensor when the merger
    asks for one, then merge each (tests/mergers/conftest.py fills the schema's defaults)."""
    def run(tensors, **parameters):
        merger = make_merger(NAME, **parameters)
        inputs = {name: make_inputs(NAME, base, models, parameters, tensor=name)
                  for name, (base, models) in tensors.items()}
        for pass_index in range(merger.prepasses):
            for one in inputs.values():
                merger.observe(one, pass_index)
            merger.finish_observing(pass_index)
        return {name: merger.merge(one) for name, one in inputs.items()}

    return run


def test_registered_through_the_plugin_manager(registry, make_merger):
    from mergeplug_plugins.mergers.localize_stitch.merger import LocalizeAndStitch

    component = registry.get("merger", NAME)
    assert component.load() is LocalizeAndStitch
    assert component.reference == "arXiv:2408.13656"
    assert component.extra["needs_base"] is True and LocalizeAndStitch.needs_base
    assert with_defaults({}, component.parameters) == {"sparsity": 0.1, "scope": "model"}
    assert make_merger(NAME).prepasses == 1
    assert make_merger(NAME, scope="tensor").prepasses == 0


def test_tensor_scope_hand_example_averages_overlaps_by_their_count(stitch):
    # Top 2 of 6: model 0 keeps 5 and -4, model 1 keeps -6 and 3; (0, 0) is covered twice: (5 + 3) / 2.
    merged = stitch({"w": (BASE, MODELS)}, scope="tensor", sparsity=2 / 6)["w"]
    assert_close(merged, torch.tensor([[5.0, -3.0, 1.0], [1.0, -5.0, 1.0]]))


def test_a_position_covered_by_three_masks_is_divided_by_three(stitch):
    task_vectors = [torch.tensor([[3.0, 0.0]]), torch.tensor([[6.0, 0.0]]), torch.tensor([[9.0, 1.0]])]
    merged = stitch({"w": (torch.zeros(1, 2), task_vectors)}, scope="tensor", sparsity=0.5)["w"]
    assert_close(merged, torch.tensor([[6.0, 0.0]]))


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_sparsity_one_averages_the_models_and_zero_keeps_the_base(stitch, scope):
    assert_close(stitch({"w": (BASE, MODELS)}, scope=scope, sparsity=1.0)["w"], (MODELS[0] + MODELS[1]) / 2)
    assert_close(stitch({"w": (BASE, MODELS)}, scope=scope, sparsity=0.0)["w"], BASE)


def test_model_scope_is_top_k_over_the_concatenated_task_vector(stitch):
    base_a, base_b = torch.zeros(2, 3), torch.full((3,), 2.0)
    tv_a = [torch.tensor([[9.0, -1.0, 2.0], [0.5, 7.0, 3.0]]), torch.tensor([[1.0, 1.5, -2.5], [4.0, 0.25, 0.0]])]
    tv_b = [torch.tensor([-8.0, 0.75, 6.0]), torch.tensor([-10.0, 12.0, 5.0])]
    merged = stitch({
        "a": (base_a, [base_a + tv for tv in tv_a]),
        "b": (base_b, [base_b + tv for tv in tv_b]),
    }, scope="model", sparsity=1 / 3)
    # The definition: each model's mask is the top third of |τ_i| over both tensors together.
    whole = [torch.cat([a.flatten(), b]) for a, b in zip(tv_a, tv_b)]
    masks = [topk_mask(tv, 1 / 3) for tv in whole]
    expected = sum(torch.where(m, tv, 0.0) for m, tv in zip(masks, whole)) / sum(m.float() for m in masks).clamp_min(1)
    assert_close(merged["a"], base_a + expected[:6].view(2, 3))
    assert_close(merged["b"], base_b + expected[6:])
    # By hand: model 1's three largest entries all sit in tensor b, which a per-tensor top-k would not find.
    assert_close(expected, torch.tensor([9.0, 0.0, 0.0, 0.0, 7.0, 0.0, -9.0, 12.0, 5.0]))


def test_model_scope_rejects_a_sparsity_that_changes_between_tensors(make_merger, make_inputs):
    merger = make_merger(NAME, sparsity=0.1)
    merger.observe(make_inputs(NAME, BASE, MODELS, {"sparsity": 0.1}, tensor="a"), 0)
    with pytest.raises(MergeplugError, match="sparsity 0.2 differs from 0.1"):
        merger.observe(make_inputs(NAME, BASE, MODELS, {"sparsity": 0.2}, tensor="b"), 0)


def test_model_scope_without_the_pre_pass_is_a_clear_error(make_merger, make_inputs):
    with pytest.raises(MergeplugError, match="pre-pass"):
        make_merger(NAME).merge(make_inputs(NAME, BASE, MODELS))


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_all_zero_task_vectors_give_the_base(stitch, scope):
    assert_close(stitch({"w": (BASE, [BASE.clone(), BASE.clone()])}, scope=scope, sparsity=0.5)["w"], BASE)


def test_one_model_keeps_its_own_top_entries(stitch):
    merged = stitch({"w": (BASE, MODELS[:1])}, scope="tensor", sparsity=0.5)["w"]
    assert_close(merged, BASE + torch.tensor([[5.0, -4.0, 1.0], [0.0, 0.0, 0.0]]))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*has no tokenizer files")
def test_end_to_end_model_scope_keeps_the_top_fraction_of_the_whole_task_vector(tmp_path):
    """Through the real engine and its pre-pass: one finetune, so merged − base is τ on the mask exactly."""
    import yaml
    from safetensors.torch import load_file

    from mergeplug.engine import merge as run_recipe
    from mergeplug.testing import make_tiny_model

    base = make_tiny_model(tmp_path / "base", "llama", seed=0)
    finetune = make_tiny_model(tmp_path / "ft", base=base, seed=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": NAME, "base_model": str(base), "parameters": {"sparsity": 0.05},
                                      "models": [{"model": str(finetune)}]}))
    out = run_recipe(recipe, tmp_path / "out")
    merged, theta0, theta1 = (load_file(str(next(Path(f).glob("*.safetensors")))) for f in (out, base, finetune))
    names = sorted(theta0)

    def flat(tensors):
        return torch.cat([tensors[n].flatten() for n in names])

    tau, kept = flat(theta1) - flat(theta0), flat(merged) != flat(theta0)
    assert_close(flat(merged)[kept], flat(theta1)[kept])
    # The global top 5%: within a histogram bin of the exact count, and every kept |τ| above every dropped one.
    assert abs(int(kept.sum()) - round(0.05 * tau.numel())) <= 2
    assert float(tau[kept].abs().min()) >= float(tau[~kept].abs().max())
