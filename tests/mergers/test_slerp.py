"""slerp (Shoemake 1985): sin((1−t)Ω)/sinΩ · v0 + sin(tΩ)/sinΩ · v1, linear when the endpoints are colinear."""
import math

import pytest
import torch
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.schema import with_defaults

NAME = "slerp"
V0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
V1 = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.fixture
def merge(make_merger, make_inputs):
    """Merge one tensor as the engine does, t's default filled in (tests/mergers/conftest.py)."""
    def run(base, models, t=None):
        parameters = {} if t is None else {"t": t}
        return make_merger(NAME, **parameters).merge(make_inputs(NAME, base, models, parameters))

    return run


def test_registered_through_the_plugin_manager(registry):
    from mergeplug_plugins.mergers.slerp.merger import Slerp

    component = registry.get("merger", NAME)
    assert component.load() is Slerp
    assert component.reference == "https://doi.org/10.1145/325165.325242"
    assert not component.extra["needs_base"] and not Slerp.needs_base
    assert with_defaults({}, component.parameters) == {"t": 0.5}


def test_right_angle_midpoint_by_hand(merge):
    # Ω = π/2: both coefficients are sin(π/4) / 1.
    half = math.sqrt(0.5)
    assert_close(merge(V0, [V1]), half * V0 + half * V1)
    assert_close(merge(V0, [V1]), torch.tensor([[half, 2 * half, 0.0], [0.0, 0.0, 0.0]]))


def test_sixty_degrees_with_unequal_norms(merge):
    v0 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    v1 = torch.tensor([[0.5, 0.5 * math.sqrt(3), 0.0], [0.0, 0.0, 0.0]]) * 3  # 60° from v0, norm 3
    omega, t = math.pi / 3, 0.25
    expected = (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)
    assert_close(merge(None, [v0, v1], t), expected)


def test_t_zero_and_one_give_the_endpoints(merge):
    assert_close(merge(V0, [V1], 0.0), V0)
    assert_close(merge(V0, [V1], 1.0), V1)
    # Without a base_model, the first model is the first endpoint.
    assert_close(merge(None, [V1, V0], 0.0), V1)
    assert_close(merge(None, [V1, V0], 1.0), V0)


def test_colinear_and_opposite_endpoints_interpolate_linearly(merge):
    assert_close(merge(V0, [3 * V0], 0.25), 0.75 * V0 + 0.25 * 3 * V0)
    assert_close(merge(V0, [-2 * V0], 0.25), 0.75 * V0 + 0.25 * -2 * V0)


def test_a_zero_endpoint_interpolates_linearly(merge):
    assert_close(merge(torch.zeros(2, 3), [V1], 0.25), 0.25 * V1)


def test_wrong_number_of_endpoints_is_a_clear_error(merge):
    with pytest.raises(MergeplugError, match="exactly two endpoints"):
        merge(V0, [V1, V1])
    with pytest.raises(MergeplugError, match="exactly two endpoints"):
        merge(None, [V1])
    with pytest.raises(MergeplugError, match="exactly two endpoints"):
        merge(None, [V0, V1, V1])
