"""Space addressing, trial recipes and the validation sample: values set where the keys say, rows as MergeBench draws."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from mergeplug import MergeplugError
from mergeplug.cli import cli
from mergeplug.data import shuffled_first
from mergeplug.tuning import Address, apply_parameters, parameters_key, resolve_address

MERGE = {"method": "task_arithmetic", "base_model": "/m/base",
         "models": [{"model": "/m/math_ft", "domain": "math"}, {"model": "org/coder", "domain": "coding",
                                                                 "parameters": {"weight": 0.3}}]}


def test_addresses_by_index_reference_folder_name_and_domain():
    models = MERGE["models"]
    assert resolve_address("lambda", models) == Address("lambda")
    assert resolve_address("models.1.weight", models) == Address("weight", 1)
    assert resolve_address("models.org/coder.weight", models) == Address("weight", 1)
    assert resolve_address("models.math_ft.weight", models) == Address("weight", 0)
    assert resolve_address("models.coding.weight", models) == Address("weight", 1)
    with pytest.raises(MergeplugError, match=r"models.weight: write models.<index or model name>.<parameter>"):
        resolve_address("models.weight", models)


def test_trial_recipes_set_each_value_where_its_key_addresses_it():
    trial = apply_parameters(MERGE, {"lambda": 0.4, "models.coding.weight": 2.0, "models.0.weight": 0.5})
    assert trial == {"method": "task_arithmetic", "base_model": "/m/base", "parameters": {"lambda": 0.4},
                     "models": [{"model": "/m/math_ft", "domain": "math", "parameters": {"weight": 0.5}},
                                {"model": "org/coder", "domain": "coding", "parameters": {"weight": 2.0}}]}
    assert MERGE["models"][1]["parameters"] == {"weight": 0.3}, "the recipe itself is left as it was"
    scheduled = apply_parameters(MERGE, {"lambda": [0.2, 0.8]})
    assert scheduled["parameters"] == {"lambda": [0.2, 0.8]}


def test_a_global_per_model_parameter_is_searchable_when_no_model_sets_its_own(tune_recipe):
    result = CliRunner().invoke(cli, ["validate", str(tune_recipe(search={"space": {"weight": [0.5, 1.0]}}))])
    assert result.exit_code == 0, result.output


def test_parameters_key_ignores_order_and_tells_values_apart():
    assert parameters_key({"a": 0.1, "b": 2}) == parameters_key({"b": 2, "a": 0.1})
    assert parameters_key({"a": 0.1}) != parameters_key({"a": 0.1 + 1e-12})
    assert len(parameters_key({"a": 1})) == 16


def test_validation_rows_are_the_first_after_datasets_seed_42_shuffle():
    import datasets

    rows = [{"id": i} for i in range(50)]
    expected = datasets.Dataset.from_list(rows).shuffle(seed=42).select(range(7)).to_list()
    assert shuffled_first(rows, 7) == expected  # MergeBench's dataset.shuffle(seed=42), first N rows
    assert shuffled_first(rows, 7)[:3] == shuffled_first(rows, 3)
    assert sorted(r["id"] for r in shuffled_first(rows, None)) == list(range(50))
    assert shuffled_first(rows, 500) == shuffled_first(rows, None)
