"""Recipes: schema problems as one line each with file and JSON path, component checks, schedules, defaults."""
from __future__ import annotations

import json

import pytest

from mergeplug import MergeplugError, hookimpl
from mergeplug.recipe import check_recipe, load_recipe
from mergeplug.plugins import Registry
from tests.conftest import FakeEntryPoint

GLOBAL = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "lambda": {"type": "number", "default": 1.0, "description": "scaling"},
        "normalize": {"type": "boolean", "default": True, "description": "disjoint mean"},
    },
}
PER_MODEL = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "weight": {"type": "number", "default": 1.0, "description": "weight"},
        "density": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.2, "description": "kept fraction"},
    },
}
FT = {"type": "object", "additionalProperties": False,
      "properties": {"lr": {"type": "number", "exclusiveMinimum": 0, "default": 2e-5, "description": "learning rate"}}}


class Plugin:
    @hookimpl
    def register_mergers(self, register):
        register("ties", "x:y", description="d", parameters=GLOBAL, model_parameters=PER_MODEL, needs_base=True)
        register("dare_ties", "x:y", description="d", parameters=GLOBAL, model_parameters=PER_MODEL, needs_base=True)
        register("slerp", "x:y", description="d", parameters=None, needs_base=False)

    @hookimpl
    def register_domains(self, register):
        for name in ("math", "coding"):
            register(name, "x:y", description=name)

    @hookimpl
    def register_finetuners(self, register):
        register("full", "x:y", description="full", parameters=FT)


@pytest.fixture(scope="module")
def registry():
    return Registry(entry_points=[FakeEntryPoint("acme", Plugin())])


def problems_of(data, registry, source="recipe.yaml"):
    with pytest.raises(MergeplugError) as info:
        check_recipe(data, source=source, registry=registry)
    return info.value.problems


def ties_recipe(**over):
    data = {"method": "ties", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}
    data.update(over)
    return data


def test_value_out_of_range_names_file_and_json_path(registry):
    data = ties_recipe(models=[{"model": "a"}, {"model": "b", "parameters": {"density": 1.7}}])
    assert problems_of(data, registry) == ["recipe.yaml: models[1].parameters.density: 1.7 is greater than the maximum of 1"]


def test_every_problem_is_reported_once(registry):
    data = ties_recipe(models=[{"model": "a", "parameters": {"density": -1}}, {"model": "b", "parameters": {"weight": "x"}}],
                       seed=-3)
    lines = problems_of(data, registry)
    assert lines == ["recipe.yaml: seed: -3 is less than the minimum of 0"]  # envelope first; components after it passes
    lines = problems_of({**data, "seed": 1}, registry)
    assert lines == [
        "recipe.yaml: models[0].parameters.density: -1 is less than the minimum of 0",
        "recipe.yaml: models[1].parameters.weight: 'x' is not of type 'number'",
    ]


def test_unknown_key_is_rejected_with_a_suggestion(registry):
    data = ties_recipe(models=[{"model": "a", "paramters": {"weight": 1}}, {"model": "b"}])
    (line,) = problems_of(data, registry)
    assert line.startswith("recipe.yaml: models[0]: unknown field 'paramters' (did you mean 'parameters'?)")


def test_unknown_component_parameter_is_rejected(registry):
    (line,) = problems_of(ties_recipe(parameters={"lamda": 0.4}), registry)
    assert line.startswith("recipe.yaml: parameters: unknown field 'lamda' (did you mean 'lambda'?)")


def test_missing_required_field(registry):
    (line,) = problems_of({"method": "ties"}, registry)
    assert line == "recipe.yaml: (root): 'models' is required"


def test_unknown_method_lists_names_closest_first(registry):
    (line,) = problems_of(ties_recipe(method="tie"), registry)
    assert line == "recipe.yaml: method: unknown merger 'tie'; known: ties, dare_ties, slerp"


def test_merger_that_needs_a_base_says_so(registry):
    data = ties_recipe()
    del data["base_model"]
    (line,) = problems_of(data, registry)
    assert line == "recipe.yaml: base_model: merger 'ties' needs a base_model (it merges task vectors)"


def test_per_model_parameters_for_a_merger_without_them(registry):
    data = {"method": "slerp", "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b"}]}
    (line,) = problems_of(data, registry)
    assert line == "recipe.yaml: models[0].parameters: merger 'slerp' takes no per-model parameters"


def test_defaults_are_filled_and_global_per_model_values_are_inherited(registry):
    data = ties_recipe(parameters={"density": 0.5, "lambda": 0.4},
                       models=[{"model": "a"}, {"model": "b", "parameters": {"density": 0.7}}])
    recipe = check_recipe(data, source="r.yaml", registry=registry)
    assert recipe.data["parameters"] == {"lambda": 0.4, "normalize": True}
    assert recipe.data["models"][0]["parameters"] == {"weight": 1.0, "density": 0.5}
    assert recipe.data["models"][1]["parameters"] == {"weight": 1.0, "density": 0.7}
    assert recipe.data["compute_dtype"] == "float32" and recipe.data["seed"] == 0
    assert recipe.components["method"].name == "ties"


def test_schedules_are_accepted_and_each_value_checked(registry):
    ok = ties_recipe(models=[
        {"model": "a", "parameters": {"density": [0.1, 0.5, 0.9]}},
        {"model": "b", "parameters": {"density": [{"filter": "self_attn", "value": 0.3}, {"value": [0.2, 0.4]}]}},
    ])
    recipe = check_recipe(ok, source="r.yaml", registry=registry)
    assert recipe.data["models"][0]["parameters"]["density"] == [0.1, 0.5, 0.9]
    bad = ties_recipe(models=[
        {"model": "a", "parameters": {"density": [0.1, 1.5]}},
        {"model": "b", "parameters": {"density": [{"filter": 3, "value": 0.3}, {"valu": 0.2}, {"value": [0.2, 2]}]}},
    ])
    assert problems_of(bad, registry) == [
        "recipe.yaml: models[0].parameters.density[1]: 1.5 is greater than the maximum of 1",
        "recipe.yaml: models[1].parameters.density[0].filter: 3 is not a string",
        "recipe.yaml: models[1].parameters.density[1]: unknown field 'valu' in a schedule entry; allowed: filter, value",
        "recipe.yaml: models[1].parameters.density[1]: 'value' is required",
        "recipe.yaml: models[1].parameters.density[2].value[1]: 2 is greater than the maximum of 1",
    ]


def test_yaml_and_json_files(tmp_path, registry):
    good = tmp_path / "r.json"
    good.write_text(json.dumps(ties_recipe()))
    assert load_recipe(good, registry=registry).kind == "merge"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\nmodels: [a, b\n")
    with pytest.raises(MergeplugError) as info:
        load_recipe(bad, registry=registry)
    assert str(info.value).startswith("bad.yaml: line 3 column 1: invalid YAML")
    with pytest.raises(MergeplugError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml", registry=registry)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(MergeplugError, match="a recipe is a mapping"):
        load_recipe(listy, registry=registry)


def test_finetune_recipe_checks_domains_and_finetuner_parameters(registry):
    recipe = check_recipe({"kind": "finetune", "base_model": "b", "domains": "all"}, source="f.yaml", registry=registry)
    assert recipe.data["domains"] == ["all"]  # resolved when used: "all" is the capability domains
    assert recipe.data["parameters"] == {"lr": 2e-5} and recipe.data["finetuner"] == "full"
    lines = problems_of({"kind": "finetune", "base_model": "b", "domains": ["math", "maths"],
                         "parameters": {"lr": 0}}, registry, "f.yaml")
    assert lines == [
        "f.yaml: domains[1]: unknown domain 'maths'; known: math, coding",
        "f.yaml: parameters.lr: 0 is less than or equal to the minimum of 0",
    ]


def test_bench_recipe_checks_mergers_and_grids(registry):
    data = {"kind": "bench", "base_models": ["b"], "domains": ["math"],
            "mergers": ["ties", {"name": "dare_ties", "grid": {"density": [0.1, 1.2], "lamda": [1]}}]}
    lines = problems_of(data, registry, "bench.yaml")
    # The fake registry has no executor and no backend: both are named, then the grid's problems.
    assert lines[0] == "bench.yaml: executor: unknown executor 'local': no executor is installed (see `mergeplug list`)"
    assert lines[1] == ("bench.yaml: evaluation.backend: unknown backend 'transformers': no backend is installed "
                        "(see `mergeplug list`)")
    assert lines[2] == "bench.yaml: mergers[1].grid.density[1]: 1.2 is greater than the maximum of 1"
    assert lines[3].startswith("bench.yaml: mergers[1].grid.lamda: merger 'dare_ties' has no parameter 'lamda'")
    assert len(lines) == 4


def test_wrong_kind_for_command(registry):
    with pytest.raises(MergeplugError, match="this is a finetune recipe, but a merge recipe was expected"):
        check_recipe({"kind": "finetune", "base_model": "b", "domains": "math"}, source="x", registry=registry, kind="merge")


def test_yaml_numbers_without_a_dot_read_as_numbers(tmp_path):
    """YAML 1.2 floats (2e-5, 1E8) are numbers, as people write them; PyYAML alone (YAML 1.1) made them strings."""
    from mergeplug.recipe import read_recipe_file

    path = tmp_path / "r.yaml"
    path.write_text("a: 2e-5\nb: 1E8\nc: -3.5e+2\nd: 12\ne: 0x10\nf: 1_000\ng: 2024-01-02\nh: '1e8'\ni: .5\n"
                    "j: .inf\nk: 1.5\nl: e8\nm: 1e\n")
    data = read_recipe_file(path)
    assert data["a"] == 2e-5 and isinstance(data["a"], float)
    assert data["b"] == 1e8 and isinstance(data["b"], float)
    assert data["c"] == -350.0
    assert (data["d"], data["e"], data["f"]) == (12, 16, 1000) and all(isinstance(data[k], int) for k in "def")
    assert str(data["g"]) == "2024-01-02"  # still a date
    assert data["h"] == "1e8"  # quoted: a string
    assert (data["i"], data["j"], data["k"]) == (0.5, float("inf"), 1.5)
    assert (data["l"], data["m"]) == ("e8", "1e")


def test_a_finetune_recipe_takes_a_learning_rate_written_3e_5(tmp_path, registry):
    path = tmp_path / "ft.yaml"
    path.write_text("kind: finetune\nbase_model: base\ndomains: [math]\nparameters:\n  lr: 3e-5\n")
    recipe = load_recipe(path, registry=registry)
    assert recipe.data["parameters"]["lr"] == 3e-5
