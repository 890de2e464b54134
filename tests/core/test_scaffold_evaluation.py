"""`mergeplug new-plugin evaluator|judge`: complete packages that pip installs into the registry and whose own
tests pass; `new-plugin backend` refuses with a pointer to the built-in backend."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from mergeplug.cli import cli
from mergeplug.schema import load_schema
from mergeplug.scaffold import write_plugin

ROOT = Path(__file__).resolve().parents[2]


def run(args, env_extra=None, cwd=ROOT.parent):
    # Not from the checkout: `python -c` and `-m` put the working folder first on sys.path. No pytest plugin
    # autoload (pytest-benchmark alone adds half a second to each run).
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_evaluator_package_is_complete(tmp_path):
    folder = write_plugin("evaluator", "answer_check", tmp_path / "pkg")
    assert files_of(folder) == [
        "README.md", "mergeplug_answer_check/__init__.py", "mergeplug_answer_check/answer_check_metric.py",
        "mergeplug_answer_check/evaluator.py", "mergeplug_answer_check/parameters.json", "pyproject.toml",
        "tests/test_answer_check.py",
    ]
    package = folder / "mergeplug_answer_check"
    assert 'answer_check = "mergeplug_answer_check"' in (folder / "pyproject.toml").read_text()
    init = (package / "__init__.py").read_text()
    assert '"mergeplug_answer_check.evaluator:AnswerCheckEvaluator"' in init
    assert "def register_evaluators(register):" in init and "torch" not in init
    schema = json.loads((package / "parameters.json").read_text())
    assert list(jsonschema.Draft202012Validator(load_schema("component-parameters")).iter_errors(schema)) == []
    assert schema["properties"] == {"case_sensitive": {
        "type": "boolean", "default": False,
        "description": schema["properties"]["case_sensitive"]["description"]}}
    # evaluate parses the metric module's imports as text: one plain `import` per line, nothing else imported.
    metric = (package / "answer_check_metric.py").read_text()
    imports = [line for line in metric.splitlines() if re.match(r"\s*(import|from)\s", line)]
    assert imports == ["import datasets", "import evaluate"]
    assert "class AnswerCheckMetric(evaluate.Metric):" in metric
    assert 'with_name("answer_check_metric.py")' in (package / "evaluator.py").read_text()
    assert "evaluator: answer_check" in (folder / "README.md").read_text()


def test_judge_package_is_complete(tmp_path):
    folder = write_plugin("judge", "polite_refusal", tmp_path / "pkg")
    assert files_of(folder) == [
        "README.md", "mergeplug_polite_refusal/__init__.py", "mergeplug_polite_refusal/judge.py",
        "mergeplug_polite_refusal/parameters.json", "pyproject.toml", "tests/test_polite_refusal.py",
    ]
    package = folder / "mergeplug_polite_refusal"
    init = (package / "__init__.py").read_text()
    assert '"mergeplug_polite_refusal.judge:PoliteRefusalJudge"' in init and "def register_judges(register):" in init
    schema = json.loads((package / "parameters.json").read_text())
    assert list(jsonschema.Draft202012Validator(load_schema("component-parameters")).iter_errors(schema)) == []
    assert schema["properties"]["prefixes"]["default"][:2] == ["I'm sorry", "I am sorry"]
    assert "class PoliteRefusalJudge(Judge):" in (package / "judge.py").read_text()
    assert "judge: polite_refusal" in (folder / "README.md").read_text()


@pytest.mark.parametrize("kind, message", [
    ("backend", "new-plugin backend: no template: a backend is a whole model runner; start from the built-in one, "
                "plugins/backends/transformers"),
])
def test_kinds_without_a_template_are_refused_in_one_line(tmp_path, kind, message):
    result = CliRunner().invoke(cli, ["new-plugin", kind, "thing", "-o", str(tmp_path / "pkg")])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {message}") and result.output.count("\n") == 1
    assert not (tmp_path / "pkg").exists()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The evaluator and judge packages written by new-plugin, installed by one pip call into their own folder."""
    base = tmp_path_factory.mktemp("thirdparty_eval")
    evaluator = write_plugin("evaluator", "answer_check", base / "mergeplug-answer-check")
    judge = write_plugin("judge", "polite_refusal", base / "mergeplug-polite-refusal")
    site = base / "site"
    result = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  "--target", str(site), str(evaluator), str(judge)])
    assert result.returncode == 0, result.stderr
    return evaluator, judge, site


def test_pip_installed_evaluator_and_judge_are_in_the_registry(installed):
    _, _, site = installed
    # The metric module and the schema travel with the package.
    assert (site / "mergeplug_answer_check" / "answer_check_metric.py").is_file()
    assert (site / "mergeplug_answer_check" / "parameters.json").is_file()
    result = run([sys.executable, "-m", "mergeplug", "list", "--json"], {"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    got = {name: (rows[name]["kind"], rows[name]["distribution"], rows[name]["version"], rows[name]["reference"],
                  rows[name]["status"]) for name in ("answer_check", "polite_refusal")}
    assert got == {
        "answer_check": ("evaluator", "mergeplug-answer-check", "0.1.0", "arXiv:2307.03172", "ok"),
        "polite_refusal": ("judge", "mergeplug-polite-refusal", "0.1.0", "arXiv:2308.01263", "ok"),
    }


def test_the_generated_tests_pass_as_written(installed):
    evaluator, judge, site = installed
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(evaluator / "tests"),
                  str(judge / "tests")], {"PYTHONPATH": str(site)}, cwd=evaluator.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b9 passed\b", result.stdout), result.stdout
