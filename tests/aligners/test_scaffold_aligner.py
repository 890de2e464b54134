"""`mergeplug new-plugin aligner`: a package that pip installs into the registry and whose tests pass as written."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema

from mergeplug.schema import load_schema
from mergeplug.scaffold import write_plugin

ROOT = Path(__file__).resolve().parents[2]


def run(args, env_extra=None, cwd=ROOT.parent):
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_aligner_package_installs_lists_and_passes_its_own_tests(tmp_path):
    folder = write_plugin("aligner", "casefold", tmp_path / "mergeplug-casefold")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "mergeplug_casefold/__init__.py", "mergeplug_casefold/aligner.py",
        "mergeplug_casefold/parameters.json", "pyproject.toml", "tests/test_casefold.py"]
    init = (folder / "mergeplug_casefold" / "__init__.py").read_text()
    assert '"mergeplug_casefold.aligner:CasefoldAligner"' in init and "def register_aligners(register):" in init
    schema = json.loads((folder / "mergeplug_casefold" / "parameters.json").read_text())
    assert list(jsonschema.Draft202012Validator(load_schema("component-parameters")).iter_errors(schema)) == []
    assert "aligner: {name: casefold" in (folder / "README.md").read_text()

    site = tmp_path / "site"
    result = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                  str(site), str(folder)])
    assert result.returncode == 0, result.stderr
    result = run([sys.executable, "-m", "mergeplug", "list", "--json", "--kind", "aligner"], {"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert (rows["casefold"]["distribution"], rows["casefold"]["status"]) == ("mergeplug-casefold", "ok")
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
                 {"PYTHONPATH": str(site)}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b2 passed\b", result.stdout), result.stdout
