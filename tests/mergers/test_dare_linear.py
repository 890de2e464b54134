"""dare_linear: random drop with rescale, then task arithmetic (arXiv:2311.03099)."""
import torch

from mergeplug.merging import uniform
from torch.testing import assert_close

BASE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
TAU1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 0.2, 4.0]])
TAU2 = torch.tensor([[-2.2, 2.0, -3.0], [-0.5, 0.1, 2.5]])


def dropped(inputs, i, tau, density, rescale=True):
    """DARE by hand: the keep mask drawn from the documented generator, kept entries / density."""
    keep = uniform(inputs.random_key(i), 0, tau.numel()).view(tau.shape) < density
    kept = torch.where(keep, tau, torch.zeros_like(tau))
    return kept / density if rescale else kept


def test_registered_through_the_plugin_manager(check_registration):
    cls = check_registration("dare_linear")
    assert cls.__name__ == "DareLinearMerger" and cls.needs_base is True


def test_drop_rescale_and_weighted_sum_match_the_formula(make_merger, make_inputs):
    params = {"lambda": 0.7}
    inputs = make_inputs("dare_linear", BASE, [BASE + TAU1, BASE + TAU2], params,
                         [{"density": 0.5, "weight": 1.0}, {"density": 0.25, "weight": 2.0}], seed=3)
    merged = make_merger("dare_linear", **params).merge(inputs)
    expected = BASE + 0.7 * (dropped(inputs, 0, TAU1, 0.5) + 2.0 * dropped(inputs, 1, TAU2, 0.25))
    assert_close(merged, expected)
    kept = dropped(inputs, 0, TAU1, 0.5) != 0
    assert 0 < int(kept.sum()) < 6, "the test seed must drop some entries and keep some"


def test_without_rescale(make_merger, make_inputs):
    inputs = make_inputs("dare_linear", BASE, [BASE + TAU1], {"rescale": False}, {"density": 0.5}, seed=1)
    merged = make_merger("dare_linear", rescale=False).merge(inputs)
    assert_close(merged, BASE + dropped(inputs, 0, TAU1, 0.5, rescale=False))


def test_density_one_is_task_arithmetic_and_zero_is_base(make_merger, make_inputs):
    models = [BASE + TAU1, BASE + TAU2]
    merger = make_merger("dare_linear")
    assert_close(merger.merge(make_inputs("dare_linear", BASE, models, model_parameters={"density": 1.0})), BASE + TAU1 + TAU2)
    assert_close(merger.merge(make_inputs("dare_linear", BASE, models, model_parameters={"density": 0.0})), BASE)
    assert_close(merger.merge(make_inputs("dare_linear", BASE, [BASE.clone(), BASE.clone()])), BASE)


def test_same_seed_same_bytes_other_seed_or_tensor_differs(make_merger, make_inputs):
    base = torch.zeros(16, 16)
    models = [torch.randn(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    merger = make_merger("dare_linear")

    def run(seed, tensor="model.layers.0.self_attn.q_proj.weight"):
        return merger.merge(make_inputs("dare_linear", base, models, model_parameters={"density": 0.5}, seed=seed, tensor=tensor))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert not torch.equal(run(0), run(0, tensor="model.layers.1.self_attn.q_proj.weight"))


def test_default_density_keeps_a_tenth_and_preserves_the_expectation(make_merger, make_inputs):
    base = torch.zeros(200, 100)
    merged = make_merger("dare_linear").merge(make_inputs("dare_linear", base, [base + 1.0], seed=5))
    kept = merged != 0
    assert abs(float(kept.float().mean()) - 0.1) < 0.01  # default density 0.1 = MergeBench's p = 0.9
    assert_close(merged[kept], torch.full((int(kept.sum()),), 10.0))
    assert abs(float(merged.mean()) - 1.0) < 0.1


def test_end_to_end_through_the_merge_engine_is_seeded(assert_engine_matches, merge_checkpoints):
    first = assert_engine_matches("dare_linear", {"lambda": 0.5}, [{"density": 0.3}, {"density": 0.6}], seed=4)
    again = merge_checkpoints("dare_linear", {"lambda": 0.5}, [{"density": 0.3}, {"density": 0.6}], seed=4)
    assert all(torch.equal(first[n], again[n]) for n in first)


def test_normalize_divides_by_the_weight_sum(make_merger, make_inputs):
    params = {"normalize": True}
    inputs = make_inputs("dare_linear", BASE, [BASE + TAU1, BASE + TAU2], params,
                         [{"density": 0.5, "weight": 1.0}, {"density": 0.5, "weight": 3.0}], seed=7)
    expected = BASE + (dropped(inputs, 0, TAU1, 0.5) + 3.0 * dropped(inputs, 1, TAU2, 0.5)) / 4.0
    assert_close(make_merger("dare_linear", **params).merge(inputs), expected)
