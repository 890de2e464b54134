"""The command line: list, show, validate, new-plugin, --version, exit codes and one-line errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mergeplug import __version__, hookimpl
from mergeplug.cli import cli
from mergeplug.plugins import Registry
from tests.conftest import FakeEntryPoint

PARAMS = {"type": "object", "additionalProperties": False, "properties": {
    "lambda": {"type": "number", "minimum": 0, "default": 1.0, "description": "Scales the merged task vector."}}}
PER_MODEL = {"type": "object", "additionalProperties": False, "properties": {
    "density": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.2, "description": "Kept fraction."}}}


class Acme:
    @hookimpl
    def register_mergers(self, register):
        register("ties", "x:y", description="Trim, elect sign, merge.", parameters=PARAMS,
                 model_parameters=PER_MODEL, reference="arXiv:2306.01708", needs_base=True)

    @hookimpl
    def register_families(self, register):
        register("llama", "x:y", description="Llama models.", model_types=["llama"])


@pytest.fixture
def runner(use_registry):
    use_registry(Registry(entry_points=[
        FakeEntryPoint("acme", Acme(), dist="acme-plugins", version="1.0"),
        FakeEntryPoint("broken_one", ImportError("No module named 'nope'"), dist="broken-dist", version="0.1"),
    ]))
    return CliRunner()


def test_list_table_grouped_by_kind_with_broken_plugins(runner):
    result = runner.invoke(cli, ["list"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "PLUGIN", "VERSION", "DESCRIPTION"]
    assert lines[1].split()[:4] == ["merger", "ties", "acme", "1.0"]
    assert lines[2] == ""  # a blank line between kinds
    assert lines[3].split()[:2] == ["family", "llama"]
    assert "BROKEN: ImportError: No module named 'nope'" in result.output


def test_list_json_fields_and_kind_filter(runner):
    rows = json.loads(runner.invoke(cli, ["list", "--json"]).output)
    ties = next(r for r in rows if r["name"] == "ties")
    assert {k: ties[k] for k in ("kind", "plugin", "version", "description", "status", "error")} == {
        "kind": "merger", "plugin": "acme", "version": "1.0", "description": "Trim, elect sign, merge.",
        "status": "ok", "error": None}
    broken = next(r for r in rows if r["name"] == "broken_one")
    assert broken["status"] == "broken" and broken["error"] == "ImportError: No module named 'nope'"
    only = json.loads(runner.invoke(cli, ["list", "--kind", "family", "--json"]).output)
    assert [r["name"] for r in only] == ["llama"]


def test_show_prints_reference_and_parameters_with_defaults(runner):
    result = runner.invoke(cli, ["show", "ties"])
    assert result.exit_code == 0, result.output
    assert "merger ties: Trim, elect sign, merge." in result.output
    assert "reference: arXiv:2306.01708" in result.output
    assert "lambda (number, >= 0, default 1.0)" in result.output
    assert "density (number, >= 0, <= 1, default 0.2)" in result.output
    doc = json.loads(runner.invoke(cli, ["show", "ties", "--json"]).output)
    assert doc["parameters"]["properties"]["lambda"]["default"] == 1.0
    assert doc["model_parameters"]["properties"]["density"]["default"] == 0.2


def test_show_unknown_name(runner):
    result = runner.invoke(cli, ["show", "tie"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == "error: unknown component 'tie'; known: ties, llama"


def test_other_commands_warn_once_about_broken_plugins(runner, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: ties\nbase_model: b\nmodels: [{model: a}]\n")
    result = runner.invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 0
    assert result.output.count("plugin broken_one (broken-dist) is broken") == 1
    assert "a valid merge recipe (merger ties)" in result.output


def test_validate_bad_recipe_exits_2_with_one_line_per_problem(runner, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase_model: b\nmodels:\n  - model: a\n  - model: c\n    parameters: {density: 1.7}\n")
    result = runner.invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert "error: recipe.yaml: models[1].parameters.density: 1.7 is greater than the maximum of 1" in result.output
    assert "Traceback" not in result.output


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.output.strip() == f"mergeplug {__version__}"


def test_new_plugin_refuses_bad_name_and_non_empty_folder(runner, tmp_path):
    result = runner.invoke(cli, ["new-plugin", "merger", "Bad-Name", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "must be lower case" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    result = runner.invoke(cli, ["new-plugin", "merger", "ok", "-o", str(tmp_path / "full")])
    assert result.exit_code == 2 and "already exists and is not empty" in result.output
    result = runner.invoke(cli, ["new-plugin", "executor", "ok", "-o", str(tmp_path / "f")])
    assert result.exit_code == 2 and "plugins/executors/local" in result.output
    assert not (tmp_path / "f").exists()
