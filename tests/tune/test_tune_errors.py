"""Bad tune recipes fail before any model is opened, with one line naming the field and what to do."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from mergeplug.cli import cli


def errors(*args):
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 2, result.output
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def ta(world, *models, **extra):
    return {"method": "task_arithmetic", "base_model": str(world["base"]), "models": list(models), **extra}


def test_a_valid_recipe_validates(tune_recipe):
    result = CliRunner().invoke(cli, ["validate", str(tune_recipe())])
    assert result.exit_code == 0
    assert result.stdout.strip().endswith(
        "a valid tune recipe (merger task_arithmetic, strategy grid, domain math)")


def test_a_model_without_a_domain(tune_recipe, world):
    path = tune_recipe(merge=ta(world, {"model": str(world["math"])}))
    assert errors("tune", path, "-o", path.parent / "out") == [
        f"error: tune.yaml: merge: models[0] ({world['math']}) has no domain: the objective divides the merged "
        f"model's score on each domain by its specialist's; give it `domain:` (e.g. domain: math)"]
    assert not (path.parent / "out").exists()


def test_a_domain_without_validation_data(tune_recipe, world):
    path = tune_recipe(merge=ta(world, {"model": str(world["math"]), "domain": "math"},
                                {"model": str(world["other"]), "domain": "general"}))
    assert errors("validate", path) == [
        "error: tune.yaml: objective: domain general (models[1]) has no validation set to score on; give held-out "
        "files with data: {general: {data_files: val.jsonl}} (instruction, response)"]


def test_two_specialists_of_one_domain(tune_recipe, world):
    path = tune_recipe(merge=ta(world, {"model": str(world["math"]), "domain": "math"},
                                {"model": str(world["other"]), "domain": "math"}))
    assert errors("validate", path) == [
        "error: tune.yaml: merge: models[0] and models[1] both have domain math; the objective needs one specialist "
        "per domain"]


def test_an_empty_space(tune_recipe):
    assert errors("validate", tune_recipe(search={"space": {}})) == [
        "error: tune.yaml: search.space is empty: name at least one parameter of merger 'task_arithmetic' to search "
        "(e.g. lambda: [0.2, 0.4, 0.6])"]
    assert errors("validate", tune_recipe(search={"space": {"lambda": []}})) == [
        "error: tune.yaml: search.space.lambda: no values to try; give a list such as [0.2, 0.4]"]


def test_an_unknown_parameter(tune_recipe):
    assert errors("validate", tune_recipe(search={"space": {"lamda": [0.5]}})) == [
        "error: tune.yaml: search.space.lamda: merger 'task_arithmetic' has no parameter 'lamda'; its parameters: "
        "lambda, normalize, weight"]
    assert errors("validate", tune_recipe(search={"space": {"models.0.density": [0.5]}})) == [
        "error: tune.yaml: search.space.models.0.density: merger 'task_arithmetic' has no per-model parameter "
        "'density'; its per-model parameters: weight"]


def test_model_addresses(tune_recipe, world):
    assert errors("validate", tune_recipe(search={"space": {"models.3.weight": [0.5]}})) == [
        "error: tune.yaml: search.space.models.3.weight: the merge recipe has 1 model(s) (models.0 to models.0)"]
    assert errors("validate", tune_recipe(search={"space": {"models.coding.weight": [0.5]}})) == [
        f"error: tune.yaml: search.space.models.coding.weight: 'coding' matches no model; name a model by index, "
        f"reference, folder name or domain (0: {world['math']})"]
    by_name = f"models.{world['math']}.weight"
    for key in ("models.0.weight", "models.math.weight", "models.math_specialist.weight", by_name):
        result = CliRunner().invoke(cli, ["validate", str(tune_recipe(search={"space": {key: [0.5, 1.0]}}))])
        assert result.exit_code == 0, (key, result.output)
    # A global per-model parameter would be overridden by a model's own value: say which key to search instead.
    own = tune_recipe(merge=ta(world, {"model": str(world["math"]), "domain": "math", "parameters": {"weight": 2.0}}),
                      search={"space": {"weight": [0.5]}})
    assert errors("validate", own) == [
        "error: tune.yaml: search.space.weight: models[0] sets its own weight, which would override the searched "
        "one; search models.0.weight instead"]


def test_bad_space_values_name_the_parameter_and_the_value(tune_recipe):
    assert errors("validate", tune_recipe(search={"space": {"lambda": [0.5, "high"]}})) == [
        "error: tune.yaml: search.space.lambda[1]: 'high' is not of type 'number'"]
    assert errors("validate", tune_recipe(search={"space": {"normalize": [True, 3]}})) == [
        "error: tune.yaml: search.space.normalize[1]: 3 is not of type 'boolean'"]
    assert errors("validate", tune_recipe(search={"strategy": "random", "trials": 3,
                                                  "space": {"lambda": {"low": 1.0, "high": 0.5}}})) == [
        "error: tune.yaml: search.space.lambda: low 1.0 is greater than high 0.5"]
    assert errors("validate", tune_recipe(search={"strategy": "random", "trials": 3,
                                                  "space": {"lambda": {"low": 0, "high": 1, "log": True}}})) == [
        "error: tune.yaml: search.space.lambda: log: true samples log-uniformly and needs low > 0, got 0"]


def test_strategy_problems(tune_recipe):
    assert errors("validate", tune_recipe(search={"space": {"lambda": {"low": 0.0, "high": 1.0}}})) == [
        "error: tune.yaml: search: strategy grid: lambda is a range {low, high}; grid search needs a list of values "
        "(ranges are sampled by strategy random)"]
    assert errors("validate", tune_recipe(search={"strategy": "random", "space": {"lambda": [0.5]}})) == [
        "error: tune.yaml: search: strategy random: it proposes points until stopped; give search.trials "
        "(e.g. trials: 20)"]
    lines = errors("validate", tune_recipe(search={"strategy": "bayes", "space": {"lambda": [0.5]}}))
    assert len(lines) == 1
    assert lines[0].startswith("error: tune.yaml: search.strategy: unknown strategy 'bayes'; known:")
    assert errors("validate", tune_recipe(search={"strategy": {"name": "grid", "parameters": {"shufle": True}},
                                                  "space": {"lambda": [0.5]}})) == [
        "error: tune.yaml: search.strategy.parameters: unknown field 'shufle' (did you mean 'shuffle'?); "
        "allowed: shuffle"]


def test_merge_recipe_problems_are_reported_as_the_merge_part(tune_recipe, world, tmp_path):
    lines = errors("validate", tune_recipe(merge=ta(world, {"model": str(world["math"]), "domain": "math"},
                                                    method="task_arithmetik")))
    assert len(lines) == 1 and lines[0].startswith(
        "error: tune.yaml: merge: method: unknown merger 'task_arithmetik'; known: task_arithmetic")
    assert errors("validate", tune_recipe(merge="missing.yaml")) == [
        "error: tune.yaml: merge: missing.yaml: no such merge recipe file"]


def test_a_merge_recipe_file_beside_the_tune_recipe(tune_recipe, world, tmp_path, monkeypatch):
    import yaml

    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(ta(world, {"model": str(world["math"]), "domain": "math"})))
    path = tune_recipe(merge="merge.yaml")
    monkeypatch.chdir(tmp_path.parent)  # read beside the tune recipe, not from the working directory
    from mergeplug.tuning import load_tune_recipe

    recipe = load_tune_recipe(path)
    assert recipe.components["merge.method"].name == "task_arithmetic"
    assert recipe.data["search"]["strategy"] == {"name": "grid", "parameters": {"shuffle": False}}
    assert recipe.data["objective"] == {"measure": "likelihood", "limit": 200, "backend": "transformers",
                                        "batch_size": 16, "dtype": "auto", "max_length": None}


def test_data_keys_must_be_tuned_domains(tune_recipe, world):
    path = tune_recipe(data={"math": {"data_files": str(world["val"])}, "coding": {"data_files": str(world["val"])}})
    assert errors("validate", path) == [
        "error: tune.yaml: data.coding: not one of the tuned domains (math); with measure likelihood, data: is keyed "
        "by domain"]
    bench = tune_recipe(objective={"measure": "benchmarks"}, data={"gsm8k": {"data_files": "x.jsonl"},
                                                                    "math.math": {"data_files": "y.jsonl"},
                                                                    "humaneval": {"data_files": "z.jsonl"}})
    assert errors("validate", bench) == [
        "error: tune.yaml: data.humaneval: no benchmark of the tuned domains is called that (math: gsm8k, math); "
        "with measure benchmarks, data: is keyed by benchmark or domain.benchmark"]


@pytest.mark.filterwarnings("ignore:model .* is longer than max_length:UserWarning")  # the 8-shot prompts, tiny model
def test_benchmarks_on_test_splits_warn_and_a_zero_specialist_is_an_error(tune_recipe, tmp_path, offline, world):
    path = tune_recipe(objective={"measure": "benchmarks", "limit": 1, "max_new_tokens": 2}, data={})
    result = CliRunner().invoke(cli, ["tune", str(path), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    stderr = result.stderr.splitlines()
    assert [line for line in stderr if "tunes on test splits" in line] == [
        "mergeplug: warning: measure benchmarks tunes on test splits (math/gsm8k, math/math): the best score "
        "overstates held-out performance; give held-out files with data:"]
    assert [line for line in stderr if line.startswith("error:")] == [
        f"error: specialist of domain math ({world['math']}) scores 0.0: normalised performance divides by it; score "
        f"more samples (objective.limit) or use measure: likelihood"]
