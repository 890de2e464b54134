"""della_linear: MAGPRUNE (arXiv:2406.11617) then task arithmetic."""
import pytest
import torch
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.merging import magprune_keep_probabilities, uniform

BASE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
TAU1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 0.2, 4.0]])
TAU2 = torch.tensor([[-2.2, 2.0, -3.0], [-0.5, 0.1, 2.5]])


def pruned(inputs, i, tau, density, epsilon, rescale=True):
    """MAGPRUNE by hand: rank-based keep probabilities, draws from the documented generator, kept / p."""
    probs = magprune_keep_probabilities(tau, density, epsilon)
    keep = uniform(inputs.random_key(i), 0, tau.numel()).view(tau.shape) < probs
    kept = torch.where(keep, tau, torch.zeros_like(tau))
    return kept / probs if rescale else kept


def test_registered_through_the_plugin_manager(check_registration):
    cls = check_registration("della_linear")
    assert cls.__name__ == "DellaLinearMerger" and cls.needs_base is True


def test_keep_probabilities_grow_linearly_with_rank_within_each_row():
    t = torch.tensor([[0.1, -0.4, 0.2, 0.3], [1.0, 2.0, -3.0, 0.0]])
    # density 0.5, ε 0.2: rank r of 0..3 gets 0.4 + 0.2·r/3
    expected = torch.tensor([[0.4, 0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3], [0.4 + 0.2 / 3, 0.4 + 0.4 / 3, 0.6, 0.4]])
    assert_close(magprune_keep_probabilities(t, 0.5, 0.2), expected)
    assert_close(magprune_keep_probabilities(t[0], 0.5, 0.2), expected[0])
    assert_close(magprune_keep_probabilities(torch.ones(3, 1), 0.5, 0.2), torch.full((3, 1), 0.5))


def test_merge_matches_the_formula(make_merger, make_inputs):
    params = {"lambda": 0.8}
    inputs = make_inputs("della_linear", BASE, [BASE + TAU1, BASE + TAU2], params,
                         [{"density": 0.5, "epsilon": 0.2, "weight": 1.0}, {"density": 0.6, "epsilon": 0.4, "weight": 0.5}], seed=2)
    merged = make_merger("della_linear", **params).merge(inputs)
    expected = BASE + 0.8 * (pruned(inputs, 0, TAU1, 0.5, 0.2) + 0.5 * pruned(inputs, 1, TAU2, 0.6, 0.4))
    assert_close(merged, expected)
    no_rescale = make_inputs("della_linear", BASE, [BASE + TAU1], {"rescale": False}, {"density": 0.5, "epsilon": 0.2}, seed=2)
    assert_close(make_merger("della_linear", rescale=False).merge(no_rescale), BASE + pruned(no_rescale, 0, TAU1, 0.5, 0.2, False))


def test_epsilon_zero_is_dare(make_merger, make_inputs):
    gen = torch.Generator().manual_seed(3)
    base, models = torch.randn(8, 8, generator=gen), [torch.randn(8, 8, generator=gen) for _ in range(2)]
    della = make_merger("della_linear").merge(make_inputs("della_linear", base, models, model_parameters={"density": 0.4, "epsilon": 0.0}, seed=9))
    dare = make_merger("dare_linear").merge(make_inputs("dare_linear", base, models, model_parameters={"density": 0.4}, seed=9))
    assert_close(della, dare)


def test_large_entries_survive_more_often_and_expectation_is_kept(make_merger, make_inputs):
    base = torch.zeros(400, 100)
    tau = torch.arange(1.0, 101.0).repeat(400, 1)
    merged = make_merger("della_linear").merge(make_inputs("della_linear", base, [tau], model_parameters={"density": 0.5, "epsilon": 0.4}, seed=1))
    kept = (merged != 0).float().mean(dim=0)
    assert abs(float(kept[0]) - 0.3) < 0.08 and abs(float(kept[-1]) - 0.7) < 0.08
    assert abs(float(kept.mean()) - 0.5) < 0.02
    assert abs(float(merged.mean()) / float(tau.mean()) - 1.0) < 0.05


def test_density_edges_seeds_and_bad_epsilon(make_merger, make_inputs):
    merger = make_merger("della_linear")
    models = [BASE + TAU1, BASE + TAU2]
    assert_close(merger.merge(make_inputs("della_linear", BASE, models, model_parameters={"density": 1.0})), BASE + TAU1 + TAU2)
    assert_close(merger.merge(make_inputs("della_linear", BASE, models, model_parameters={"density": 0.0})), BASE)
    assert_close(merger.merge(make_inputs("della_linear", BASE, [BASE.clone(), BASE.clone()])), BASE)
    big = [torch.randn(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    run = lambda seed: merger.merge(make_inputs("della_linear", torch.zeros(16, 16), big, seed=seed))  # noqa: E731
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    with pytest.raises(MergeplugError, match=r"model.layers.0.mlp.up_proj.weight: models\[1\] \(model1\): density 0.1 with epsilon 0.3"):
        merger.merge(make_inputs("della_linear", BASE, models, model_parameters=[{}, {"density": 0.1, "epsilon": 0.3}]))


def test_end_to_end_through_the_merge_engine(assert_engine_matches):
    assert_engine_matches("della_linear", {"rescale": False}, [{"density": 0.4, "epsilon": 0.2}, {"weight": 0.5}], seed=6)


def test_normalize_divides_by_the_weight_sum(make_merger, make_inputs):
    params = {"normalize": True}
    inputs = make_inputs("della_linear", BASE, [BASE + TAU1, BASE + TAU2], params,
                         [{"density": 0.5, "epsilon": 0.2, "weight": 2.0}, {"density": 0.5, "epsilon": 0.2, "weight": 2.0}],
                         seed=3)
    expected = BASE + (pruned(inputs, 0, TAU1, 0.5, 0.2) + pruned(inputs, 1, TAU2, 0.5, 0.2)) / 2.0
    assert_close(make_merger("della_linear", **params).merge(inputs), expected)
