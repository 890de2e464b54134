"""varm (arXiv:2402.16107): per-matrix weights W_i = mean(τ_i²) / Σ_j mean(τ_j²), θ = θ_base + Σ W_i τ_i."""
import pytest
import torch
from torch.testing import assert_close

from mergeplug.schema import with_defaults

NAME = "varm"
BASE = torch.full((2, 3), 2.0)


@pytest.fixture
def merge(make_merger, make_inputs):
    """Merge base + task_vectors as the engine does (tests/mergers/conftest.py)."""
    def run(base, task_vectors):
        models = [base + tv for tv in task_vectors]
        return make_merger(NAME).merge(make_inputs(NAME, base, models))

    return run


def test_registered_through_the_plugin_manager(registry):
    from mergeplug_plugins.mergers.varm.merger import VaRM

    component = registry.get("merger", NAME)
    assert component.load() is VaRM
    assert component.reference == "arXiv:2402.16107"
    assert component.extra["needs_base"] is True and VaRM.needs_base
    assert with_defaults({}, component.parameters) == {}


def test_hand_example(merge):
    # mean squares: 1, 4/6, 0 → W = (0.6, 0.4, 0).
    tv1 = torch.ones(2, 3)
    tv2 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    tv3 = torch.zeros(2, 3)
    expected = BASE + torch.tensor([[1.4, 0.6, 0.6], [0.6, 0.6, 0.6]])
    assert_close(merge(BASE, [tv1, tv2, tv3]), expected)


def test_weights_are_per_matrix(merge):
    # The same two models, two matrices: model 0 moved more in the first, model 1 in the second.
    a = merge(torch.zeros(1, 2), [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]])])
    b = merge(torch.zeros(1, 2), [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])])
    assert_close(a, torch.tensor([[0.9 * 3.0, 0.1 * 1.0]]))
    assert_close(b, torch.tensor([[0.1 * 1.0, 0.9 * 3.0]]))


def test_equal_variation_is_a_plain_average(merge):
    tv1 = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    tv2 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, -1.0]])
    assert_close(merge(BASE, [tv1, tv2]), BASE + (tv1 + tv2) / 2)


def test_all_zero_updates_give_the_base(merge):
    assert_close(merge(BASE, [torch.zeros(2, 3), torch.zeros(2, 3)]), BASE)


def test_one_model_gives_that_model(merge):
    tv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert_close(merge(BASE, [tv]), BASE + tv)
