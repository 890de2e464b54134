"""dare_ties: random drop with rescale (arXiv:2311.03099), then TIES election and disjoint merge (arXiv:2306.01708)."""
import torch
from torch.testing import assert_close

from mergeplug.merging import disjoint_merge, elect_sign, uniform

BASE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
TAU1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 0.2, 4.0]])
TAU2 = torch.tensor([[-2.2, 2.0, -3.0], [-0.5, 0.1, 2.5]])


def dropped(inputs, i, tau, density):
    keep = uniform(inputs.random_key(i), 0, tau.numel()).view(tau.shape) < density
    return torch.where(keep, tau, torch.zeros_like(tau)) / density


def test_registered_through_the_plugin_manager(check_registration):
    cls = check_registration("dare_ties")
    assert cls.__name__ == "DareTiesMerger" and cls.needs_base is True


def test_density_one_is_ties_without_trim(make_merger, make_inputs):
    merged = make_merger("dare_ties").merge(
        make_inputs("dare_ties", BASE, [BASE + TAU1, BASE + TAU2], model_parameters={"density": 1.0}))
    # signs of τ1 + τ2 = [[0.8, 1, -2.5], [-2.5, 0.3, 6.5]]; disjoint means of the agreeing entries
    assert_close(merged, BASE + torch.tensor([[3.0, 2.0, -3.0], [-1.25, 0.15, 3.25]]))


def test_drop_then_election_matches_the_formula(make_merger, make_inputs):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    taus = [torch.randn(6, 8, generator=gen) for _ in range(3)]
    params = {"lambda": 0.4}
    inputs = make_inputs("dare_ties", base, [base + t for t in taus], params, {"density": 0.5}, seed=11)
    merged = make_merger("dare_ties", **params).merge(inputs)
    pruned = [dropped(inputs, i, t, 0.5) for i, t in enumerate(taus)]
    expected = base + 0.4 * disjoint_merge(pruned, torch.ones(3), elect_sign(pruned), normalize=True)
    assert_close(merged, expected)
    summed = make_merger("dare_ties", normalize=False).merge(
        make_inputs("dare_ties", base, [base + t for t in taus], {"normalize": False}, {"density": 0.5}, seed=11))
    assert_close(summed, base + disjoint_merge(pruned, torch.ones(3), elect_sign(pruned), normalize=False))


def test_edge_cases_give_base_or_the_single_model(make_merger, make_inputs):
    merger = make_merger("dare_ties")
    assert_close(merger.merge(make_inputs("dare_ties", BASE, [BASE + TAU1, BASE - TAU1], model_parameters={"density": 1.0})), BASE)
    assert_close(merger.merge(make_inputs("dare_ties", BASE, [BASE + TAU1, BASE + TAU2], model_parameters={"density": 0.0})), BASE)
    assert_close(merger.merge(make_inputs("dare_ties", BASE, [BASE.clone()])), BASE)
    one = make_inputs("dare_ties", BASE, [BASE + TAU1], model_parameters={"density": 0.5}, seed=2)
    assert_close(merger.merge(one), BASE + dropped(one, 0, TAU1, 0.5))


def test_same_seed_same_bytes_other_seed_differs(make_merger, make_inputs):
    base = torch.zeros(16, 16)
    models = [torch.randn(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    merger = make_merger("dare_ties")

    def run(seed):
        return merger.merge(make_inputs("dare_ties", base, models, model_parameters={"density": 0.3}, seed=seed))

    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def test_end_to_end_through_the_merge_engine(assert_engine_matches):
    assert_engine_matches("dare_ties", {"lambda": 0.6}, [{"density": 0.5}, {"density": 0.4}], seed=2)
