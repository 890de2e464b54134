"""breadcrumbs: drop outliers and tiny entries per tensor, then task arithmetic (arXiv:2312.06795)."""
import torch
from torch.testing import assert_close

from mergeplug.merging import breadcrumbs_mask

# magnitudes, largest first: 5 (0,1), 3 (1,2), 2 (0,3), 1 (1,0), .7 (1,4), .4 (1,3), .3 (0,2), .2 (0,4), .1 (0,0), .05 (1,1)
T = torch.tensor([[0.1, -5.0, 0.3, 2.0, -0.2], [1.0, 0.05, -3.0, 0.4, 0.7]])


def test_registered_through_the_plugin_manager(check_registration):
    cls = check_registration("breadcrumbs")
    assert cls.__name__ == "BreadcrumbsMerger" and cls.needs_base is True


def test_mask_drops_the_outliers_and_keeps_the_next_band():
    # gamma 0.1: the 1 largest (5) goes; density 0.5: the next 5 (3, 2, 1, .7, .4) stay
    expected = torch.tensor([[False, False, False, True, False], [True, False, True, True, True]])
    assert torch.equal(breadcrumbs_mask(T, 0.5, 0.1), expected)
    # density 0.8: only the outlier and the smallest (.05) go
    assert torch.equal(breadcrumbs_mask(T, 0.8, 0.1), torch.tensor([[True, False, True, True, True], [True, False, True, True, True]]))
    # gamma 0 is plain top-k
    assert torch.equal(breadcrumbs_mask(T, 0.3, 0.0), T.abs() >= 2.0)


def test_mask_edge_cases():
    assert bool(breadcrumbs_mask(T, 1.0, 0.1).all())          # density wins over gamma
    assert not bool(breadcrumbs_mask(T, 0.0, 0.1).any())
    # gamma + density > 1: fewer outliers dropped so density is kept (mergekit's rule): only 5 goes
    assert torch.equal(breadcrumbs_mask(T, 0.9, 0.2), T.abs() < 5.0)
    tied = breadcrumbs_mask(torch.ones(10), 0.5, 0.1)
    assert int(tied.sum()) == 5


def test_merge_matches_hand_computation(make_merger, make_inputs):
    base = torch.arange(10.0).reshape(2, 5)
    tau2 = torch.tensor([[1.0, 0.0, 0.0, 0.0, 9.0], [0.0, -2.0, 0.0, 0.5, 0.0]])
    params = {"lambda": 0.5}
    inputs = make_inputs("breadcrumbs", base, [base + T, base + tau2], params,
                         [{"density": 0.5, "gamma": 0.1, "weight": 1.0}, {"density": 0.2, "gamma": 0.1, "weight": 2.0}])
    merged = make_merger("breadcrumbs", **params).merge(inputs)
    masked1 = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0], [1.0, 0.0, -3.0, 0.4, 0.7]])
    masked2 = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0, 0.0]])  # 9 is the outlier
    assert_close(merged, base + 0.5 * (masked1 + 2.0 * masked2))


def test_defaults_and_edge_cases(make_merger, make_inputs):
    base = torch.zeros(10, 10)
    tau = torch.arange(1.0, 101.0).reshape(10, 10)
    merged = make_merger("breadcrumbs").merge(make_inputs("breadcrumbs", base, [tau]))
    # defaults density 0.9, gamma 0.01: the largest (100) and the 9 smallest (1..9) go
    assert_close(merged, torch.where((tau > 9) & (tau < 100), tau, torch.zeros_like(tau)))
    merger = make_merger("breadcrumbs")
    assert_close(merger.merge(make_inputs("breadcrumbs", base, [tau], model_parameters={"density": 0.0})), base)
    assert_close(merger.merge(make_inputs("breadcrumbs", base, [tau], model_parameters={"density": 1.0})), tau)
    assert_close(merger.merge(make_inputs("breadcrumbs", base, [base.clone(), base.clone()])), base)


def test_end_to_end_through_the_merge_engine(assert_engine_matches):
    assert_engine_matches("breadcrumbs", {"lambda": 0.7}, [{"density": 0.5, "gamma": 0.1}, {"density": 0.8, "gamma": 0.05}])


def test_normalize_divides_by_the_weight_sum(make_merger, make_inputs):
    base = torch.zeros(2, 5)
    params = {"normalize": True}
    inputs = make_inputs("breadcrumbs", base, [T, 2 * T], params, [{"density": 0.5, "gamma": 0.1, "weight": 1.0},
                                                                   {"density": 0.5, "gamma": 0.1, "weight": 3.0}])
    masked = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0], [1.0, 0.0, -3.0, 0.4, 0.7]])
    assert_close(make_merger("breadcrumbs", **params).merge(inputs), (masked + 3.0 * 2 * masked) / 4.0)
