"""della: MAGPRUNE (arXiv:2406.11617), then TIES election and disjoint merge."""
import torch
from torch.testing import assert_close

from mergeplug.merging import disjoint_merge, elect_sign, magprune_keep_probabilities, uniform

BASE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
TAU1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 0.2, 4.0]])
TAU2 = torch.tensor([[-2.2, 2.0, -3.0], [-0.5, 0.1, 2.5]])


def pruned(inputs, i, tau, density, epsilon):
    probs = magprune_keep_probabilities(tau, density, epsilon)
    keep = uniform(inputs.random_key(i), 0, tau.numel()).view(tau.shape) < probs
    return torch.where(keep, tau, torch.zeros_like(tau)) / probs


def test_registered_through_the_plugin_manager(check_registration):
    cls = check_registration("della")
    assert cls.__name__ == "DellaMerger" and cls.needs_base is True


def test_density_one_is_ties_without_trim(make_merger, make_inputs):
    merged = make_merger("della").merge(make_inputs("della", BASE, [BASE + TAU1, BASE + TAU2], model_parameters={"density": 1.0}))
    assert_close(merged, BASE + torch.tensor([[3.0, 2.0, -3.0], [-1.25, 0.15, 3.25]]))


def test_prune_then_election_matches_the_formula(make_merger, make_inputs):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 10, generator=gen)
    taus = [torch.randn(6, 10, generator=gen) for _ in range(3)]
    params = {"lambda": 1.1}
    inputs = make_inputs("della", base, [base + t for t in taus], params, seed=8)
    merged = make_merger("della", **params).merge(inputs)
    # defaults: density 0.7, ε 0.14 (keep probabilities 0.63 .. 0.77 per row)
    parts = [pruned(inputs, i, t, 0.7, 0.14) for i, t in enumerate(taus)]
    assert_close(merged, base + 1.1 * disjoint_merge(parts, torch.ones(3), elect_sign(parts), normalize=True))


def test_edge_cases_give_base(make_merger, make_inputs):
    merger = make_merger("della")
    assert_close(merger.merge(make_inputs("della", BASE, [BASE + TAU1, BASE - TAU1], model_parameters={"density": 1.0})), BASE)
    assert_close(merger.merge(make_inputs("della", BASE, [BASE + TAU1, BASE + TAU2], model_parameters={"density": 0.0})), BASE)
    assert_close(merger.merge(make_inputs("della", BASE, [BASE.clone(), BASE.clone()])), BASE)
    one = make_inputs("della", BASE, [BASE + TAU1], model_parameters={"density": 0.5, "epsilon": 0.2}, seed=5)
    assert_close(merger.merge(one), BASE + pruned(one, 0, TAU1, 0.5, 0.2))


def test_same_seed_same_bytes_other_seed_differs(make_merger, make_inputs):
    models = [torch.randn(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    merger = make_merger("della")
    run = lambda seed: merger.merge(make_inputs("della", torch.zeros(16, 16), models, seed=seed))  # noqa: E731
    assert torch.equal(run(6), run(6)) and not torch.equal(run(6), run(7))


def test_end_to_end_through_the_merge_engine(assert_engine_matches):
    assert_engine_matches("della", {"lambda": 0.9}, [{"density": 0.5, "epsilon": 0.3}, {}], seed=5)
