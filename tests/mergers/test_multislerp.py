"""multislerp: Buss & Fillmore's weighted spherical average, applied as slerp applies its coefficients."""
import math

import pytest
import torch
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.schema import with_defaults

NAME = "multislerp"


@pytest.fixture
def merge(make_merger, make_inputs):
    """Merge one tensor as the engine does, per-model weights given (tests/mergers/conftest.py)."""
    def run(base, models, weights=None):
        own = [{"weight": w} for w in (weights or [1.0] * len(models))]
        return make_merger(NAME).merge(make_inputs(NAME, base, models, model_parameters=own))

    return run


def test_registered_through_the_plugin_manager(registry):
    from mergeplug_plugins.mergers.multislerp.merger import MultiSlerp

    component = registry.get("merger", NAME)
    assert component.load() is MultiSlerp
    assert component.reference == "https://doi.org/10.1145/502122.502124"
    assert not component.extra["needs_base"] and not MultiSlerp.needs_base
    assert with_defaults({}, component.model_parameters) == {"weight": 1.0}


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("with_base", [False, True])
def test_two_models_with_weights_one_minus_t_and_t_equal_slerp(merge, make_merger, make_inputs, t, with_base):
    gen = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(3, 4, generator=gen) for _ in range(3))
    # With a base, multislerp interpolates the task vectors: slerp between them, shifted back by the base.
    endpoints = [a - base, b - base] if with_base else [a, b]
    expected = make_merger("slerp", t=t).merge(make_inputs("slerp", None, endpoints, {"t": t}))
    merged = merge(base if with_base else None, [a, b], [1 - t, t])
    assert_close(merged, expected + (base if with_base else 0))


def test_three_orthogonal_directions_meet_at_the_centre(merge):
    # Equal weights on e1, e2, e3: by symmetry q = (e1 + e2 + e3)/√3, so each coefficient is 1/√3 and it
    # multiplies each vector itself (norms 2, 1, 4).
    vectors = [torch.zeros(2, 3) for _ in range(3)]
    for i, norm in enumerate([2.0, 1.0, 4.0]):
        vectors[i][0, i] = norm
    expected = torch.tensor([[2.0, 1.0, 4.0], [0.0, 0.0, 0.0]]) / math.sqrt(3)
    assert_close(merge(None, vectors), expected)


def test_the_result_is_the_weighted_karcher_mean_of_the_directions(merge):
    from mergeplug_plugins.mergers.multislerp.merger import spherical_coefficients

    gen = torch.Generator().manual_seed(1)
    vectors = [torch.randn(4, 5, generator=gen, dtype=torch.float64) + 1.0 for _ in range(4)]
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    c = spherical_coefficients(vectors, weights, "w")
    units = [(v / v.norm()).flatten() for v in vectors]
    q = sum(ci * u for ci, u in zip(c.tolist(), units))
    assert float(q.norm()) == pytest.approx(1.0, abs=1e-9)
    # Optimality: Σ_i w_i log_q(u_i) = 0 (Buss & Fillmore's fixed point).
    gradient = sum(w * (math.acos(float(u @ q)) / math.sin(math.acos(float(u @ q)))) * (u - float(u @ q) * q)
                   for w, u in zip(weights.tolist(), units))
    assert float(gradient.norm()) < 1e-9
    merged = merge(None, vectors, weights.tolist())
    assert_close(merged, sum(ci * v for ci, v in zip(c.tolist(), vectors)))


def test_weights_are_normalised(merge):
    gen = torch.Generator().manual_seed(2)
    vectors = [torch.randn(2, 3, generator=gen) for _ in range(3)]
    assert_close(merge(None, vectors, [1.0, 2.0, 3.0]), merge(None, vectors, [2.0, 4.0, 6.0]))


def test_a_zero_weight_model_drops_out(merge):
    gen = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(2, 3, generator=gen) for _ in range(3))
    assert_close(merge(None, [a, b, c], [1.0, 1.0, 0.0]), merge(None, [a, b], [1.0, 1.0]))


def test_colinear_vectors_and_zero_vectors_give_the_weighted_average(merge):
    v = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    assert_close(merge(None, [v, 2 * v, -v], [0.5, 0.25, 0.25]), 0.5 * v + 0.5 * v - 0.25 * v)
    w = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    assert_close(merge(None, [v, w, torch.zeros(2, 3)], [0.5, 0.25, 0.25]), 0.5 * v + 0.25 * w)


def test_one_model_gives_that_model(merge):
    base, model = torch.ones(2, 3), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert_close(merge(None, [model]), model)
    assert_close(merge(base, [model]), model)


def test_with_a_base_the_task_vectors_are_interpolated(merge):
    base = torch.full((2, 3), 10.0)
    e = [torch.zeros(2, 3) for _ in range(3)]
    for i in range(3):
        e[i][1, i] = 3.0
    expected = base + torch.tensor([[0.0, 0.0, 0.0], [3.0, 3.0, 3.0]]) / math.sqrt(3)
    assert_close(merge(base, [base + x for x in e]), expected)


def test_cancelling_directions_and_bad_weights_are_clear_errors(merge):
    e1 = torch.tensor([[1.0, 0.0, 0.0]])
    e2 = torch.tensor([[0.0, 1.0, 0.0]])
    with pytest.raises(MergeplugError, match="cancel out"):
        merge(None, [e1, -e1, e2, -e2])
    with pytest.raises(MergeplugError, match="weights must be >= 0"):
        merge(None, [e1, e2], [1.0, -1.0])
    with pytest.raises(MergeplugError, match="weights must be >= 0"):
        merge(None, [e1, e2], [0.0, 0.0])
