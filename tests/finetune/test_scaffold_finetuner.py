"""`mergeplug new-plugin finetuner`: a complete package that pip installs into the registry, whose finetuner
trains through the core's run and whose own tests pass as written."""
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
    # Outside the checkout (`-m` puts the working folder first on sys.path); no pytest plugin autoload.
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_finetuner_package_installs_lists_and_passes_its_own_tests(tmp_path):
    folder = write_plugin("finetuner", "frozen_embeddings", tmp_path / "mergeplug-frozen-embeddings")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "mergeplug_frozen_embeddings/__init__.py", "mergeplug_frozen_embeddings/finetuner.py",
        "mergeplug_frozen_embeddings/parameters.json", "pyproject.toml", "tests/test_frozen_embeddings.py"]
    package = folder / "mergeplug_frozen_embeddings"
    init = (package / "__init__.py").read_text()
    assert '"mergeplug_frozen_embeddings.finetuner:FrozenEmbeddingsFinetuner"' in init
    assert "def register_finetuners(register):" in init and "torch" not in init
    schema = json.loads((package / "parameters.json").read_text())
    assert list(jsonschema.Draft202012Validator(load_schema("component-parameters")).iter_errors(schema)) == []
    assert schema["properties"]["freeze_embeddings"]["default"] is True
    assert "--finetuner frozen_embeddings" in (folder / "README.md").read_text()

    site = tmp_path / "site"
    result = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                  str(site), str(folder)])
    assert result.returncode == 0, result.stderr
    result = run([sys.executable, "-m", "mergeplug", "list", "--json", "--kind", "finetuner"],
                 {"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert (rows["frozen_embeddings"]["distribution"], rows["frozen_embeddings"]["status"]) == (
        "mergeplug-frozen-embeddings", "ok")
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
                 {"PYTHONPATH": str(site)}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b3 passed\b", result.stdout), result.stdout
