"""ties: trim, elect sign, disjoint merge (arXiv:2306.01708), per tensor or over the whole model."""
import pytest
import torch
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.merging import disjoint_merge, elect_sign, topk_mask
from mergeplug.recipe import check_recipe

BASE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
TAU1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 0.2, 4.0]])    # top 3 by magnitude: 4, 3, -2
TAU2 = torch.tensor([[-2.2, 2.0, -3.0], [-0.5, 0.1, 2.5]])   # top 3 by magnitude: -3, 2.5, -2.2
# trimmed (density 0.5): τ̂1 = [[3, 0, 0], [-2, 0, 4]], τ̂2 = [[-2.2, 0, -3], [0, 0, 2.5]]
# elected sign of τ̂1 + τ̂2 = [[0.8, 0, -3], [-2, 0, 6.5]]: [[+, 0, -], [-, 0, +]]


def merge(make_merger, make_inputs, models=(TAU1, TAU2), parameters=None, model_parameters=None, base=BASE):
    parameters = parameters or {}
    inputs = make_inputs("ties", base, [base + t for t in models], parameters, model_parameters)
    return make_merger("ties", **parameters).merge(inputs)


def test_registered_through_the_plugin_manager(check_registration):
    cls = check_registration("ties")
    assert cls.__name__ == "TiesMerger" and cls.needs_base is True and cls.prepasses == 0


def test_disjoint_mean_matches_hand_computation(make_merger, make_inputs):
    merged = merge(make_merger, make_inputs, model_parameters={"density": 0.5})
    # (0,0): only τ̂1 = 3 agrees with +; (1,2): mean of 4 and 2.5
    assert_close(merged, BASE + torch.tensor([[3.0, 0.0, -3.0], [-2.0, 0.0, 3.25]]))


def test_disjoint_sum_and_lambda(make_merger, make_inputs):
    merged = merge(make_merger, make_inputs, parameters={"normalize": False, "lambda": 0.5}, model_parameters={"density": 0.5})
    assert_close(merged, BASE + 0.5 * torch.tensor([[3.0, 0.0, -3.0], [-2.0, 0.0, 6.5]]))


def test_weights_enter_the_vote_and_the_weighted_mean(make_merger, make_inputs):
    merged = merge(make_merger, make_inputs, model_parameters=[{"density": 0.5, "weight": 1.0}, {"density": 0.5, "weight": 3.0}])
    # vote τ̂1 + 3τ̂2 = [[-3.6, 0, -9], [-2, 0, 11.5]]; (1,2): (1·4 + 3·2.5) / (1 + 3)
    assert_close(merged, BASE + torch.tensor([[-2.2, 0.0, -3.0], [-2.0, 0.0, 2.875]]))


def test_count_election(make_merger, make_inputs):
    merged = merge(make_merger, make_inputs, parameters={"sign_method": "count"}, model_parameters={"density": 0.5})
    # (0,0): one + and one − vote: tie, nothing kept
    assert_close(merged, BASE + torch.tensor([[0.0, 0.0, -3.0], [-2.0, 0.0, 3.25]]))


def test_density_one_keeps_everything_and_zero_gives_base(make_merger, make_inputs):
    full = merge(make_merger, make_inputs, model_parameters={"density": 1.0})
    assert_close(full, BASE + torch.tensor([[3.0, 2.0, -3.0], [-1.25, 0.15, 3.25]]))
    assert_close(merge(make_merger, make_inputs, model_parameters={"density": 0.0}), BASE)


def test_default_density_is_the_papers_top_20_percent(make_merger, make_inputs):
    tau = torch.arange(1.0, 11.0).reshape(2, 5)
    merged = merge(make_merger, make_inputs, models=(tau,), base=torch.zeros(2, 5))
    assert_close(merged, torch.tensor([[0.0] * 5, [0.0, 0.0, 0.0, 9.0, 10.0]]))


def test_edge_cases_give_base_or_the_single_model(make_merger, make_inputs):
    assert_close(merge(make_merger, make_inputs, models=(TAU1, -TAU1), model_parameters={"density": 1.0}), BASE)
    assert_close(merge(make_merger, make_inputs, models=(torch.zeros(2, 3), torch.zeros(2, 3))), BASE)
    one = merge(make_merger, make_inputs, models=(TAU1,), model_parameters={"density": 0.5, "weight": 0.3})
    assert_close(one, BASE + torch.tensor([[3.0, 0.0, 0.0], [-2.0, 0.0, 4.0]]))


# --- trim_scope: model ----------------------------------------------------------------------------------------
def run_model_scope(make_merger, make_inputs, tensors, density, **parameters):
    """Feed every tensor through the pre-pass, then merge each: what the engine does."""
    merger = make_merger("ties", trim_scope="model", **parameters)
    assert merger.prepasses == 1
    inputs = [
        make_inputs("ties", base, [base + t for t in taus], {"trim_scope": "model", **parameters},
                    {"density": density}, tensor=name)
        for name, base, taus in tensors
    ]
    for item in inputs:
        merger.observe(item, 0)
    merger.finish_observing(0)
    return [merger.merge(item) for item in inputs]


def test_model_scope_trims_over_all_tensors_by_hand(make_merger, make_inputs):
    a1, b1 = torch.tensor([[5.0, -1.0, 0.3], [2.0, -4.0, 0.1]]), torch.tensor([0.2, -0.6, 3.0, 0.05])
    a2, b2 = torch.tensor([[-1.0, 2.0, 0.5], [1.5, -0.7, 6.0]]), torch.tensor([-2.5, 0.4, 0.05, 0.9])
    tensors = [("a", torch.zeros(2, 3), [a1, a2]), ("b", torch.ones(4), [b1, b2])]
    merged_a, merged_b = run_model_scope(make_merger, make_inputs, tensors, density=0.3)
    # top 3 of 10 per model: model 1 keeps 5, -4 (a) and 3 (b); model 2 keeps 2, 6 (a) and -2.5 (b)
    assert_close(merged_a, torch.tensor([[5.0, 2.0, 0.0], [0.0, -4.0, 6.0]]))
    assert_close(merged_b, torch.ones(4) + torch.tensor([-2.5, 0.0, 3.0, 0.0]))


def test_model_scope_equals_topk_of_the_concatenation(make_merger, make_inputs):
    gen = torch.Generator().manual_seed(7)
    shapes = {"x": (8, 16), "y": (32,)}
    bases = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    taus = {n: [torch.randn(s, generator=gen) * (3.0 if n == "y" else 1.0) for _ in range(3)] for n, s in shapes.items()}
    merged = run_model_scope(make_merger, make_inputs, [(n, bases[n], taus[n]) for n in shapes], density=0.25,
                             normalize=True)
    # reference: per model, top-k over the flattened concatenation of both tensors, split back
    trimmed = {n: [] for n in shapes}
    for i in range(3):
        flat = torch.cat([taus[n][i].flatten() for n in shapes])
        kept = flat * topk_mask(flat, 0.25)
        trimmed["x"].append(kept[:128].view(8, 16))
        trimmed["y"].append(kept[128:])
    ones = torch.ones(3)
    for (n, _), out in zip(shapes.items(), merged):
        expected = bases[n] + disjoint_merge(trimmed[n], ones, elect_sign(trimmed[n]), normalize=True)
        assert_close(out, expected)
    # and it differs from trimming each tensor on its own
    per_tensor = make_merger("ties").merge(
        make_inputs("ties", bases["y"], [bases["y"] + t for t in taus["y"]], model_parameters={"density": 0.25}, tensor="y"))
    assert not torch.allclose(per_tensor, merged[1])


def test_model_scope_rejects_a_density_schedule(make_merger, make_inputs):
    merger = make_merger("ties", trim_scope="model")
    base = torch.zeros(3)
    merger.observe(make_inputs("ties", base, [base + 1], model_parameters={"density": 0.3}, tensor="layers.0.w"), 0)
    with pytest.raises(MergeplugError, match="one density per model"):
        merger.observe(make_inputs("ties", base, [base + 1], model_parameters={"density": 0.5}, tensor="layers.1.w"), 0)


def test_model_scope_without_prepass_and_bad_scope_are_clear_errors(make_merger, make_inputs):
    with pytest.raises(MergeplugError, match="pre-pass"):
        make_merger("ties", trim_scope="model").merge(make_inputs("ties", BASE, [BASE + TAU1]))
    with pytest.raises(MergeplugError, match="trim_scope"):
        make_merger("ties", trim_scope=[{"value": "model"}])


def test_recipe_validation_uses_the_schemas(registry):
    recipe = check_recipe({"method": "ties", "base_model": "b", "models": [{"model": "m1"}, {"model": "m2", "parameters": {"density": 0.5}}]},
                          source="r.yaml", registry=registry)
    assert recipe.data["parameters"] == {"lambda": 1.0, "normalize": True, "sign_method": "sum", "trim_scope": "tensor"}
    assert [m["parameters"] for m in recipe.data["models"]] == [{"weight": 1.0, "density": 0.2}, {"weight": 1.0, "density": 0.5}]
    with pytest.raises(MergeplugError, match="trim_scope"):
        check_recipe({"method": "ties", "base_model": "b", "models": [{"model": "m"}], "parameters": {"trim_scope": "layer"}},
                     source="r.yaml", registry=registry)
    with pytest.raises(MergeplugError, match="needs a base_model"):
        check_recipe({"method": "ties", "models": [{"model": "m"}]}, source="r.yaml", registry=registry)


def test_end_to_end_through_the_merge_engine(assert_engine_matches):
    assert_engine_matches("ties", {"lambda": 0.8, "normalize": False}, [{"density": 0.4}, {"density": 0.6, "weight": 2.0}])


def test_end_to_end_model_scope_uses_the_engines_prepass(merge_checkpoints, tiny_checkpoints):
    merged = merge_checkpoints("ties", {"trim_scope": "model"}, [{"density": 0.3}, {"density": 0.3}])
    w = tiny_checkpoints.tensors
    names = list(w["base"])
    sizes = [w["base"][n].numel() for n in names]
    trimmed = []
    for role in ("ft1", "ft2"):
        flat = torch.cat([(w[role][n] - w["base"][n]).flatten() for n in names])
        trimmed.append((flat * topk_mask(flat, 0.3)).split(sizes))
    for j, name in enumerate(names):
        parts = [trimmed[0][j].view_as(w["base"][name]), trimmed[1][j].view_as(w["base"][name])]
        expected = w["base"][name] + disjoint_merge(parts, torch.ones(2), elect_sign(parts), normalize=True)
        assert_close(merged[name], expected)
