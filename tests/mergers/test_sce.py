"""sce (arXiv:2408.07990): each variant against its own formula, worked by hand on one 2x3 example."""
import pytest
import torch
from torch.testing import assert_close

from mergeplug import MergeplugError
from mergeplug.schema import with_defaults

NAME = "sce"
BASE = torch.full((2, 3), 0.5)
TASK_VECTORS = [
    torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 4.0]]),
    torch.tensor([[1.0, -2.0, 0.0], [0.0, 1.0, 4.0]]),
    torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -4.0]]),
]
MODELS = [BASE + tv for tv in TASK_VECTORS]
# Population variances across the models: [[0, 96/27, 2], [0, 24/27, 384/27]]. The top half (3 of 6) are
# (1, 2), (0, 1), (0, 2); the selected vectors' energies are 4+16, 4+16, 4+9+16, so η = (20, 20, 29) / 69.
# Sign of the selected sum: + at all three.


@pytest.fixture
def merge(make_merger, make_inputs):
    """Merge one tensor as the engine does, the schema's defaults filled in (tests/mergers/conftest.py)."""
    def run(base, models, parameters=None):
        parameters = parameters or {}
        return make_merger(NAME, **parameters).merge(make_inputs(NAME, base, models, parameters))

    return run


def test_registered_through_the_plugin_manager(registry):
    from mergeplug_plugins.mergers.sce.merger import SCE

    component = registry.get("merger", NAME)
    assert component.load() is SCE
    assert component.reference == "arXiv:2408.07990"
    assert component.extra["needs_base"] is True and SCE.needs_base
    assert with_defaults({}, component.parameters) == {"select_topk": 0.1, "variant": "paper"}


def test_paper_variant_adds_the_weighted_erased_selection(merge):
    # (0,1): models 0 and 2 agree on +2: (20·2 + 29·2)/69; (0,2): model 2 alone: 29·3/69;
    # (1,2): models 0 and 1: (20·4 + 20·4)/69.
    expected = BASE + torch.tensor([[0.0, 98 / 69, 87 / 69], [0.0, 0.0, 160 / 69]])
    assert_close(merge(BASE, MODELS, {"select_topk": 0.5, "variant": "paper"}), expected)


def test_mergekit_variant_divides_by_the_surviving_weight(merge):
    # (0,1): (20·2 + 29·2)/(20 + 29) = 2; (0,2): 3; (1,2): (20·4 + 20·4)/40 = 4.
    expected = BASE + torch.tensor([[0.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    assert_close(merge(BASE, MODELS, {"select_topk": 0.5, "variant": "mergekit"}), expected)


def test_fusechat_variant_erases_and_merges_the_full_task_vectors(merge):
    # Same η; signs of Σ τ_i: [[+, +, +], [0, +, +]]. (0,0): all agree on 1; (1,0): no sign elected, base;
    # (1,1): models 1 and 2 agree on +1; (1,2): models 0 and 1 on +4.
    expected = BASE + torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 4.0]])
    assert_close(merge(BASE, MODELS, {"select_topk": 0.5, "variant": "fusechat"}), expected)


def test_fusechat_weights_from_the_selection_apply_to_unselected_positions(merge):
    # τ_2 at (0, 0) becomes 2: variance 2/9 keeps it out of the selection, so η stays (20, 20, 29)/69, and all
    # three models agree there: (20·1 + 20·1 + 29·2) / 69.
    models = [m.clone() for m in MODELS]
    models[2][0, 0] = BASE[0, 0] + 2.0
    merged = merge(BASE, models, {"select_topk": 0.5, "variant": "fusechat"})
    assert_close(merged[0, 0], BASE[0, 0] + 98 / 69)
    assert_close(merged[1:], merge(BASE, MODELS, {"select_topk": 0.5, "variant": "fusechat"})[1:])


def test_select_everything_with_identical_models_gives_that_model(merge):
    model = BASE + TASK_VECTORS[0]
    for variant in ("paper", "mergekit", "fusechat"):
        assert_close(merge(BASE, [model, model.clone()], {"select_topk": 1.0, "variant": variant}), model)


def test_select_nothing(merge):
    # paper and mergekit merge only selected positions: the base. fusechat merges the full task vectors with
    # equal weights (no selected energy): the TIES disjoint mean.
    assert_close(merge(BASE, MODELS, {"select_topk": 0.0, "variant": "paper"}), BASE)
    assert_close(merge(BASE, MODELS, {"select_topk": 0.0, "variant": "mergekit"}), BASE)
    expected = BASE + torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 4.0]])
    assert_close(merge(BASE, MODELS, {"select_topk": 0.0, "variant": "fusechat"}), expected)


def test_all_zero_task_vectors_give_the_base(merge):
    for variant in ("paper", "mergekit", "fusechat"):
        assert_close(merge(BASE, [BASE.clone(), BASE.clone()], {"variant": variant}), BASE)


def test_one_model_is_a_clear_error(merge):
    with pytest.raises(MergeplugError, match="at least two models"):
        merge(BASE, MODELS[:1])
