"""The shipped schemas are valid, and every installed component honours the contract of its kind."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import jsonschema
import pytest

from mergeplug.plugins import Registry
from mergeplug.schema import _all_schemas, load_schema

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed():
    return Registry(disabled=())


@pytest.mark.parametrize("schema_id", sorted(_all_schemas()))
def test_shipped_schemas_are_valid_draft_2020_12(schema_id):
    jsonschema.Draft202012Validator.check_schema(_all_schemas()[schema_id])


def test_every_builtin_folder_is_its_own_entry_point():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mergeplug"]
    folders = {f"{p.parent.name}.{p.name}" for p in (ROOT / "plugins").glob("*/*") if (p / "__init__.py").is_file()}
    assert folders <= set(declared), f"plugin folders without an entry point: {sorted(folders - set(declared))}"
    for name, target in declared.items():
        assert target == f"mergeplug_plugins.{name}"


def test_no_installed_plugin_is_broken(installed):
    broken = {p.name: p.error for p in installed.broken()}
    assert broken == {}


def test_no_two_plugins_share_a_component_name(installed):
    assert [c.describe() for c in installed.components() if installed.conflict(c)] == []


def test_every_component_parameter_schema_has_the_required_shape(installed):
    meta = load_schema("component-parameters")
    for c in installed.components():
        for schema in filter(None, (c.parameters if c.parameters_source is not None else None, c.model_parameters)):
            jsonschema.Draft202012Validator.check_schema(schema)
            errors = [e.message for e in jsonschema.Draft202012Validator(meta).iter_errors(schema)]
            assert errors == [], f"{c.describe()}: {errors}"
            for key, prop in schema["properties"].items():
                assert "default" in prop or key in schema.get("required", []), f"{c.describe()}: {key} has no default"


def test_every_merger_is_a_merger_with_a_paper(installed):
    from mergeplug.merging import Merger

    for c in installed.components("merger"):
        cls = c.load()
        assert isinstance(cls, type) and issubclass(cls, Merger), c.describe()
        assert bool(c.extra.get("needs_base")) == bool(cls.needs_base), f"{c.describe()}: needs_base disagrees"
        assert c.reference and re.match(r"^(arXiv:\d{4}\.\d{4,5}|https?://)", c.reference), c.describe()
        assert c.description and len(c.description) < 120, c.describe()


def test_every_family_is_a_model_family(installed):
    from mergeplug.families import ModelFamily

    for c in installed.components("family"):
        family = c.load()
        assert isinstance(family, ModelFamily), c.describe()
        assert set(c.extra["model_types"]) == set(family.model_types), c.describe()
