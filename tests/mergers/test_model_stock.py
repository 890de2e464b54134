"""model_stock (arXiv:2403.19522): t = N cosθ / (1 + (N − 1) cosθ), θ = θ_base + t · mean τ_i."""
import math

import pytest
import torch
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.schema import with_defaults

NAME = "model_stock"
BASE = torch.ones(2, 3)


@pytest.fixture
def merge(make_merger, make_inputs):
    """Merge base + task_vectors as the engine does, the schema's defaults filled in (tests/mergers/conftest.py)."""
    def run(base, task_vectors, parameters=None):
        parameters = parameters or {}
        models = [base + tv for tv in task_vectors]
        return make_merger(NAME, **parameters).merge(make_inputs(NAME, base, models, parameters))

    return run


def test_registered_through_the_plugin_manager(registry):
    from mergeplug_plugins.mergers.model_stock.merger import ModelStock

    component = registry.get("merger", NAME)
    assert component.load() is ModelStock
    assert component.reference == "arXiv:2403.19522"
    assert component.extra["needs_base"] is True and ModelStock.needs_base
    assert with_defaults({}, component.parameters) == {"filter_wise": False}


def test_two_models_at_45_degrees(merge):
    tv1 = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    tv2 = torch.tensor([[3.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    expected = BASE + t * torch.tensor([[3.0, 1.5, 0.0], [0.0, 0.0, 0.0]])
    assert_close(merge(BASE, [tv1, tv2]), expected)


def test_three_models_average_the_pairwise_cosines(merge):
    e1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    cos = (0 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 3  # pairs (e1, e2), (e1, e1+e2), (e2, e1+e2)
    t = 3 * cos / (1 + 2 * cos)
    expected = BASE + t * (e1 + e2 + (e1 + e2)) / 3
    assert_close(merge(BASE, [e1, e2, e1 + e2]), expected)


def test_identical_task_vectors_give_the_model(merge):
    tv = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 4.0]])
    assert_close(merge(BASE, [tv, tv.clone(), tv.clone()]), BASE + tv)


def test_filter_wise_computes_one_ratio_per_row(merge):
    tv1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    tv2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, -2.0, 0.0]])
    cos_row0 = 1 / math.sqrt(2)
    t_row0 = 2 * cos_row0 / (1 + cos_row0)
    # Row 1's task vectors are opposed: cos -1 is clamped to 0, so t = 0 and the row stays at the base.
    expected = BASE + torch.tensor([[t_row0 * 1.0, t_row0 * 0.5, 0.0], [0.0, 0.0, 0.0]])
    assert_close(merge(BASE, [tv1, tv2], {"filter_wise": True}), expected)
    # Per tensor: cos = (1 - 4) / (sqrt(5) * sqrt(6)) < 0, clamped: the whole tensor is the base.
    assert_close(merge(BASE, [tv1, tv2]), BASE)


def test_filter_wise_treats_a_vector_as_one_row(merge):
    base = torch.zeros(3)
    tv1, tv2 = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([3.0, 3.0, 0.0])
    assert_close(merge(base, [tv1, tv2], {"filter_wise": True}), merge(base, [tv1, tv2]))


def test_a_zero_task_vector_counts_as_orthogonal(merge):
    tv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert_close(merge(BASE, [torch.zeros(2, 3), tv]), BASE)
    # Three models, one of them zero: cos = (1 + 0 + 0) / 3 over the pairs.
    cos = 1 / 3
    t = 3 * cos / (1 + 2 * cos)
    assert_close(merge(BASE, [tv, tv.clone(), torch.zeros(2, 3)]), BASE + t * 2 * tv / 3)


def test_all_zero_task_vectors_give_the_base(merge):
    assert_close(merge(BASE, [torch.zeros(2, 3), torch.zeros(2, 3)]), BASE)


def test_one_model_is_a_clear_error(merge):
    with pytest.raises(MergeplugError, match="at least two models"):
        merge(BASE, [torch.ones(2, 3)])
