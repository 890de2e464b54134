"""The `finetune` command: a recipe with command-line overrides, --set typed by the parameter schema, and every
bad input as one line on stderr with exit code 2 before any model loads."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from mergeplug.cli import _typed_setting, cli
from mergeplug.finetuning import parameter_schema, training_defaults, training_schema
from mergeplug.plugins import Registry
from mergeplug.recipe import check_recipe


@pytest.fixture
def runner():
    return CliRunner()


def test_full_declares_the_core_training_parameters_with_the_same_defaults():
    full = Registry().get("finetuner", "full")
    assert full.parameters["properties"] == training_schema()["properties"]
    assert training_defaults() == {
        "learning_rate": 2e-5, "epochs": 2, "max_steps": None, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
        "weight_decay": 0.0, "max_grad_norm": 1.0, "per_device_batch_size": 1, "gradient_accumulation_steps": 20,
        "max_seq_length": 2048, "packing": True, "gradient_checkpointing": False, "bf16": "auto", "save_steps": 100,
        "logging_steps": 1, "seed": 42}
    from mergeplug.finetuning import Finetuner

    assert set(training_defaults()) == set(Finetuner.TRAINING_PARAMETERS)


def test_every_finetuner_takes_the_training_parameters_and_its_own_win():
    own = {"type": "object", "additionalProperties": False, "properties": {
        "learning_rate": {"type": "number", "default": 2e-4, "description": "lr"},
        "rank": {"type": "integer", "default": 8, "description": "r"}}}
    component = type("C", (), {"parameters": own})()
    schema = parameter_schema(component)
    assert schema["properties"]["learning_rate"]["default"] == 2e-4 and schema["properties"]["rank"]["default"] == 8
    assert schema["properties"]["max_seq_length"]["default"] == 2048 and schema["additionalProperties"] is False


@pytest.mark.parametrize("key, text, value", [
    ("learning_rate", "1e-5", 1e-5), ("max_steps", "7", 7), ("max_steps", "null", None), ("packing", "false", False),
    ("bf16", "auto", "auto"), ("bf16", "true", True), ("lr_scheduler", "linear", "linear"), ("epochs", "1.5", 1.5),
    ("learning_rate", "fast", "fast"),  # left as text: the schema check names the problem
])
def test_set_values_are_typed_by_the_schema(key, text, value):
    props = training_schema()["properties"]
    assert _typed_setting(text, props[key]) == value


def test_a_recipe_with_overrides(tiny, tmp_path, runner):
    local = tmp_path / "dart.jsonl"
    local.write_text('{"query": "What is 2 + 2?", "response": "2 + 2 = 4. The answer is: 4"}\n')
    recipe = tmp_path / "finetune.yaml"
    recipe.write_text(yaml.safe_dump({
        "kind": "finetune", "base_model": str(tiny.base), "domains": ["math"], "offline": True, "limit": 1,
        "parameters": {"max_seq_length": 256, "gradient_accumulation_steps": 1, "learning_rate": 1e-3},
        "data": {"math.0": {"data_files": str(local)}},
    }))
    out = tmp_path / "out"
    result = runner.invoke(cli, ["finetune", "--recipe", str(recipe), "-o", str(out), "--max-steps", "1",
                                 "--set", "seed=7", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    summary = json.loads((out / "mergeplug_finetune.json").read_text())
    assert summary["parameters"]["seed"] == 7 and summary["parameters"]["learning_rate"] == 1e-3
    assert summary["steps"] == 1 and summary["examples"] == 2  # one local row, one NuminaMath sample row (limit 1)
    assert summary["data"]["math.0"] == f"files:{local}"


def test_recipe_data_keys_name_the_recipes_domains():
    with pytest.raises(Exception) as info:
        check_recipe({"kind": "finetune", "base_model": "b", "domains": ["math"],
                      "data": {"coding": {"data_files": "x.jsonl"}}}, source="f.yaml")
    assert str(info.value) == "f.yaml: data.coding: 'coding' is not one of the recipe's domains (math)"
    recipe = check_recipe({"kind": "finetune", "base_model": "b", "domains": "math",
                           "parameters": {"learning_rate": 1e-5}}, source="f.yaml")
    assert recipe.data["parameters"]["learning_rate"] == 1e-5 and recipe.data["parameters"]["epochs"] == 2


def bad_inputs(tiny, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "1+1?", "answer": "2"}\n')
    base = str(tiny.base)
    return {
        "unknown domain": (["--base", base, "--domain", "maths"],
                           "error: unknown domain 'maths'; known: math, "),
        "no such base": (["--base", str(tmp_path / "nope"), "--domain", "math"],
                         f"error: base model {tmp_path / 'nope'}: no such folder (and not a hub id of the form "
                         "owner/name)"),
        "base not a model": (["--base", str(tmp_path), "--domain", "math"],
                             f"error: base model {tmp_path}: no config.json there; give a Hugging Face model folder or "
                             "hub id"),
        "hub id offline": (["--base", "nobody/no-such-model", "--domain", "math"],
                           "error: base model nobody/no-such-model: no such local folder, and the hub did not give its "
                           "config.json ("),
        "missing column": (["--base", base, "--domain", "math", "--data", f"math.0={wrong}"],
                           f"error: {wrong}: row 0 has no column 'query' (columns: question, answer)"),
        "output exists": (["--base", base, "--domain", "math", "-o", str(existing)],
                          f"error: {existing}: already exists; pass --force to replace it"),
        "unknown parameter": (["--base", base, "--domain", "math", "--set", "learning_rte=1"],
                              "error: finetuner full: parameters: unknown field 'learning_rte' (did you mean "
                              "'learning_rate'?)"),
        "bad value": (["--base", base, "--domain", "math", "--set", "max_seq_length=-3"],
                      "error: finetuner full: parameters.max_seq_length: -3 is less than the minimum of 8"),
        "set without =": (["--base", base, "--domain", "math", "--set", "packing"],
                          "error: --set 'packing': write KEY=VALUE (e.g. --set learning_rate=1e-5)"),
        "no training data": (["--base", base, "--domain", "general"],
                             "error: domain general: has no training data"),
        "unknown finetuner": (["--base", base, "--domain", "math", "--finetuner", "ful"],
                              "error: unknown finetuner 'ful'; known: full"),
        "missing base": (["--domain", "math"], "error: finetune: name the base model with --base"),
        "cuda:N": (["--base", base, "--domain", "math", "--device", "cuda:1"],
                   "error: --device cuda:1: pick the GPU with CUDA_VISIBLE_DEVICES=1 and --device cuda"),
    }


CASES = ["unknown domain", "no such base", "base not a model", "hub id offline", "missing column", "output exists",
         "unknown parameter", "bad value", "set without =", "no training data", "unknown finetuner", "missing base",
         "cuda:N"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, runner, case):
    args, line = bad_inputs(tiny, tmp_path)[case]
    if "-o" not in args:
        args = [*args, "-o", str(tmp_path / "out")]
    result = runner.invoke(cli, ["finetune", *args, "--offline", "--quiet"])
    assert result.exit_code == 2, result.output
    errors = [text for text in result.output.splitlines() if text.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(line), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
