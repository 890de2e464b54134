"""breadcrumbs_ties: Breadcrumbs masks (arXiv:2312.06795) with TIES election and disjoint merge (arXiv:2306.01708)."""
import torch
from torch.testing import assert_close

from mergeplug.merging import breadcrumbs_mask, disjoint_merge, elect_sign

BASE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
TAU1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 0.2, 4.0]])
TAU2 = torch.tensor([[-2.2, 2.0, -3.0], [-0.5, 0.1, 2.5]])


def test_registered_through_the_plugin_manager(check_registration):
    cls = check_registration("breadcrumbs_ties")
    assert cls.__name__ == "BreadcrumbsTiesMerger" and cls.needs_base is True


def test_without_masking_it_is_ties_of_the_full_task_vectors(make_merger, make_inputs):
    merged = make_merger("breadcrumbs_ties").merge(
        make_inputs("breadcrumbs_ties", BASE, [BASE + TAU1, BASE + TAU2], model_parameters={"density": 1.0, "gamma": 0.0}))
    assert_close(merged, BASE + torch.tensor([[3.0, 2.0, -3.0], [-1.25, 0.15, 3.25]]))


def test_masks_then_election_by_hand(make_merger, make_inputs):
    # density 0.5, gamma 1/6: drop the largest, keep the next 3
    # τ1 keeps 3, -2, -1 (4 is its outlier); τ2 keeps 2.5, -2.2, 2 (-3 is its outlier)
    params = {"lambda": 2.0}
    inputs = make_inputs("breadcrumbs_ties", BASE, [BASE + TAU1, BASE + TAU2], params, {"density": 0.5, "gamma": 1 / 6})
    merged = make_merger("breadcrumbs_ties", **params).merge(inputs)
    # masked: [[3, -1, 0], [-2, 0, 0]] and [[-2.2, 2, 0], [0, 0, 2.5]]; vote [[0.8, 1, 0], [-2, 0, 2.5]]
    assert_close(merged, BASE + 2.0 * torch.tensor([[3.0, 2.0, 0.0], [-2.0, 0.0, 2.5]]))


def test_random_tensors_match_the_reference_composition(make_merger, make_inputs):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(12, 10, generator=gen)
    taus = [torch.randn(12, 10, generator=gen) for _ in range(3)]
    inputs = make_inputs("breadcrumbs_ties", base, [base + t for t in taus], {"normalize": False}, {"density": 0.6, "gamma": 0.05})
    merged = make_merger("breadcrumbs_ties", normalize=False).merge(inputs)
    masked = [t * breadcrumbs_mask(t, 0.6, 0.05) for t in taus]
    assert_close(merged, base + disjoint_merge(masked, torch.ones(3), elect_sign(masked), normalize=False))


def test_edge_cases_give_base(make_merger, make_inputs):
    merger = make_merger("breadcrumbs_ties")
    full = {"density": 1.0, "gamma": 0.0}
    assert_close(merger.merge(make_inputs("breadcrumbs_ties", BASE, [BASE + TAU1, BASE - TAU1], model_parameters=full)), BASE)
    assert_close(merger.merge(make_inputs("breadcrumbs_ties", BASE, [BASE + TAU1], model_parameters={"density": 0.0})), BASE)
    assert_close(merger.merge(make_inputs("breadcrumbs_ties", BASE, [BASE.clone(), BASE.clone()])), BASE)
    one = merger.merge(make_inputs("breadcrumbs_ties", BASE, [BASE + TAU1], model_parameters=full))
    assert_close(one, BASE + TAU1)


def test_end_to_end_through_the_merge_engine(assert_engine_matches):
    assert_engine_matches("breadcrumbs_ties", {"sign_method": "count"}, [{"density": 0.5, "gamma": 0.1}, {"density": 0.7}])
