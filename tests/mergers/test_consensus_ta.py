"""consensus_ta: TALL masks + consensus (arXiv:2405.07813), checked on hand-made 2x3 tensors."""
import pytest
import torch
from torch.testing import assert_close

from mergeplug.schema import with_defaults

NAME = "consensus_ta"
BASE = torch.ones(2, 3)
TASK_VECTORS = [
    torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 0.0]]),
    torch.tensor([[1.0, 0.0, -2.0], [3.0, 0.0, 0.0]]),
    torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]]),
]
MODELS = [BASE + tv for tv in TASK_VECTORS]


@pytest.fixture
def merge(make_merger, make_inputs):
    """Merge one tensor as the engine does, each schema's defaults filled in (tests/mergers/conftest.py)."""
    def run(base, models, parameters=None, model_parameters=None):
        parameters = parameters or {}
        return make_merger(NAME, **parameters).merge(make_inputs(NAME, base, models, parameters, model_parameters))

    return run


def test_registered_through_the_plugin_manager(registry):
    from mergeplug_plugins.mergers.consensus_ta.merger import ConsensusTaskArithmetic

    component = registry.get("merger", NAME)
    assert component.load() is ConsensusTaskArithmetic
    assert component.reference == "arXiv:2405.07813"
    assert component.extra["needs_base"] is True and ConsensusTaskArithmetic.needs_base
    assert with_defaults({}, component.parameters) == {"k": 2, "lambda": 1.0}
    assert with_defaults({}, component.model_parameters) == {"weight": 1.0, "lambda_t": 0.4}


def test_hand_example_keeps_positions_two_tall_masks_agree_on(merge):
    # τ_MTL = [[2,1,0],[6,-1,0]]; with λ_t = 0.5 the masks vote [[2,1,3],[2,1,3]], so k = 2 keeps columns 0 and 2.
    lam = [{"lambda_t": 0.5}] * 3
    assert_close(merge(BASE, MODELS, {"k": 2}, lam), torch.tensor([[3.0, 1.0, 1.0], [7.0, 1.0, 1.0]]))
    assert_close(merge(BASE, MODELS, {"k": 2, "lambda": 0.5}, lam),
                 torch.tensor([[2.0, 1.0, 1.0], [4.0, 1.0, 1.0]]))


def test_k_one_and_zero_are_task_arithmetic_here_and_k_above_n_is_the_base(merge):
    lam = [{"lambda_t": 0.5}] * 3
    task_arithmetic = BASE + sum(TASK_VECTORS)
    assert_close(merge(BASE, MODELS, {"k": 1}, lam), task_arithmetic)
    assert_close(merge(BASE, MODELS, {"k": 0}, lam), task_arithmetic)
    assert_close(merge(BASE, MODELS, {"k": 4}, lam), BASE)


def test_lambda_t_is_per_model(merge):
    # A strict third mask (λ_t = 3) turns its vote off at (1, 0), leaving one vote there.
    lam = [{"lambda_t": 0.5}, {"lambda_t": 0.5}, {"lambda_t": 3.0}]
    assert_close(merge(BASE, MODELS, {"k": 2}, lam), torch.tensor([[3.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))


def test_weights_enter_the_multi_task_vector(merge):
    weights = [2.0, 1.0, 1.0]
    own = [{"weight": w, "lambda_t": 0.5} for w in weights]
    multi_task = sum(w * tv for w, tv in zip(weights, TASK_VECTORS))
    votes = sum((tv.abs() >= 0.5 * (multi_task - tv).abs()).int() for tv in TASK_VECTORS)
    expected = BASE + 0.7 * torch.where(votes >= 2, multi_task, 0.0)
    assert_close(merge(BASE, MODELS, {"k": 2, "lambda": 0.7}, own), expected)


def test_one_model_is_dropped_by_k_two_and_kept_by_k_one(merge):
    assert_close(merge(BASE, MODELS[:1]), BASE)
    assert_close(merge(BASE, MODELS[:1], {"k": 1, "lambda": 0.5}), BASE + 0.5 * TASK_VECTORS[0])


def test_all_zero_task_vectors_give_the_base(merge):
    assert_close(merge(BASE, [BASE.clone(), BASE.clone()], {"k": 0}), BASE)


def test_bfloat16_inputs_as_stored_merge_like_their_float32_values(make_merger, make_inputs):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(300, 700, generator=gen).to(torch.bfloat16)
    models = [(base.float() + 0.1 * torch.randn(300, 700, generator=gen)).to(torch.bfloat16) for _ in range(3)]
    stored = make_inputs("consensus_ta", base, models)
    stored.compute_dtype = torch.float32  # as the engine passes them: stored_dtype_inputs
    converted = make_inputs("consensus_ta", base.float(), [m.float() for m in models])
    merger = make_merger("consensus_ta")
    got = merger.merge(stored)
    assert got.dtype == torch.float32 and torch.equal(got, merger.merge(converted))
