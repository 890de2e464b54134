"""task_arithmetic: θ = θ_base + λ Σ_i w_i τ_i (arXiv:2212.04089)."""
import pytest
import torch
from torch.testing import assert_close

from mergeplug import MergeplugError

BASE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
TAU1 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, 0.0]])
TAU2 = torch.tensor([[0.0, 1.0, 1.0], [-1.0, 0.0, 3.0]])


def test_registered_through_the_plugin_manager(check_registration):
    cls = check_registration("task_arithmetic")
    assert cls.__name__ == "TaskArithmeticMerger" and cls.needs_base is True


def test_weighted_sum_scaled_by_lambda_matches_hand_computation(make_merger, make_inputs):
    inputs = make_inputs("task_arithmetic", BASE, [BASE + TAU1, BASE + TAU2], {"lambda": 0.4},
                         [{"weight": 0.5}, {"weight": 2.0}])
    merged = make_merger("task_arithmetic", **{"lambda": 0.4}).merge(inputs)
    # 0.4·(0.5·τ1 + 2·τ2) = 0.4·[[0.5, 2, 1.5], [-1, 0, 6]]
    assert_close(merged, torch.tensor([[1.2, 2.8, 3.6], [3.6, 5.0, 8.4]]))


def test_defaults_add_the_task_vectors(make_merger, make_inputs):
    merged = make_merger("task_arithmetic").merge(make_inputs("task_arithmetic", BASE, [BASE + TAU1, BASE + TAU2]))
    assert_close(merged, BASE + TAU1 + TAU2)


def test_one_model_gives_that_model_and_negative_weight_negates(make_merger, make_inputs):
    merger = make_merger("task_arithmetic")
    assert_close(merger.merge(make_inputs("task_arithmetic", BASE, [BASE + TAU1])), BASE + TAU1)
    negated = merger.merge(make_inputs("task_arithmetic", BASE, [BASE + TAU1], model_parameters={"weight": -1.0}))
    assert_close(negated, BASE - TAU1)


def test_zero_task_vectors_and_zero_lambda_give_the_base(make_merger, make_inputs):
    assert_close(make_merger("task_arithmetic").merge(make_inputs("task_arithmetic", BASE, [BASE.clone(), BASE.clone()])), BASE)
    inputs = make_inputs("task_arithmetic", BASE, [BASE + TAU1], {"lambda": 0.0})
    assert_close(make_merger("task_arithmetic").merge(inputs), BASE)


def test_one_dimensional_tensor_and_dtype_are_kept(make_merger, make_inputs):
    base = torch.tensor([1.0, -1.0], dtype=torch.float64)
    merged = make_merger("task_arithmetic").merge(make_inputs("task_arithmetic", base, [base + 1, base + 2]))
    assert merged.dtype == torch.float64
    assert_close(merged, torch.tensor([4.0, 2.0], dtype=torch.float64))


def test_missing_base_is_a_clear_error(make_merger, make_inputs):
    with pytest.raises(MergeplugError, match="needs a base_model"):
        make_merger("task_arithmetic").merge(make_inputs("task_arithmetic", None, [BASE, BASE]))


def test_end_to_end_through_the_merge_engine(assert_engine_matches, tiny_checkpoints):
    merged = assert_engine_matches("task_arithmetic", {"lambda": 0.5}, [{"weight": 1.0}, {"weight": -1.0}])
    w = tiny_checkpoints.tensors
    name = "model.layers.1.mlp.up_proj.weight"
    assert_close(merged[name], w["base"][name] + 0.5 * (w["ft1"][name] - w["ft2"][name]))


def test_normalize_divides_by_the_weight_sum(make_merger, make_inputs):
    params = {"normalize": True}
    inputs = make_inputs("task_arithmetic", BASE, [BASE + TAU1, BASE + TAU2], params, [{"weight": 1.0}, {"weight": 3.0}])
    assert_close(make_merger("task_arithmetic", **params).merge(inputs), BASE + (TAU1 + 3.0 * TAU2) / 4.0)
    cancelling = make_inputs("task_arithmetic", BASE, [BASE + TAU1, BASE + TAU2], params, [{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(MergeplugError, match="do not sum to 0"):
        make_merger("task_arithmetic", **params).merge(cancelling)
