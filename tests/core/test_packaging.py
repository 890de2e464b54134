"""Packaging: a separately packaged plugin installed with pip, the wheel's contents, and a light CLI start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mergeplug.scaffold import write_plugin

ROOT = Path(__file__).resolve().parents[2]


def run(args, env_extra=None, cwd=ROOT.parent):
    # Not from the checkout: `python -c` puts the working folder first on sys.path.
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_list_and_help_do_not_import_heavy_libraries():
    code = (
        "import sys\nfrom mergeplug.cli import main\n"
        "for argv in (['list'], ['--help'], ['list', '--json'], ['show', 'linear']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'safetensors') if m in sys.modules))"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """A plugin package written by `mergeplug new-plugin` and installed by pip into its own folder."""
    base = tmp_path_factory.mktemp("thirdparty")
    package = write_plugin("merger", "halfway", base / "mergeplug-halfway")
    site = base / "site"
    result = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  "--target", str(site), str(package)])
    assert result.returncode == 0, result.stderr
    return package, site


def test_pip_installed_plugin_is_listed(installed_plugin):
    _, site = installed_plugin
    result = run([sys.executable, "-m", "mergeplug", "list", "--json"], {"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    row = next(r for r in json.loads(result.stdout) if r["name"] == "halfway")
    assert (row["kind"], row["plugin"], row["distribution"], row["version"], row["status"]) == (
        "merger", "halfway", "mergeplug-halfway", "0.1.0", "ok")


def test_pip_installed_plugin_component_works(installed_plugin):
    package, site = installed_plugin
    code = (
        "import torch\nfrom mergeplug.plugins import Registry\nfrom mergeplug.merging import TensorInputs\n"
        "cls = Registry().get('merger', 'halfway').load()\n"
        "base = torch.zeros(2)\n"
        "out = cls({'scale': 0.5}).merge(TensorInputs('w', base, [torch.tensor([2., 4.])], {'scale': 0.5}, [{'weight': 1.0}]))\n"
        "print(out.tolist())"
    )
    result = run([sys.executable, "-c", code], {"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1.0, 2.0]"
    # The package's own generated test passes as written.
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
                 {"PYTHONPATH": str(site)}, cwd=package)
    assert result.returncode == 0, result.stdout + result.stderr


def test_disabling_the_installed_plugin_by_name(installed_plugin):
    _, site = installed_plugin
    result = run([sys.executable, "-m", "mergeplug", "list", "--json"],
                 {"PYTHONPATH": str(site), "MERGEPLUG_DISABLE": "halfway"})
    assert "halfway" not in [r["name"] for r in json.loads(result.stdout)]


def test_wheel_ships_schemas_plugins_and_entry_points(tmp_path):
    result = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path), str(ROOT)])
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("mergeplug-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mergeplug/schemas/merge.schema.json" in names
    assert "mergeplug/schemas/domain.schema.json" in names
    assert "mergeplug_plugins/mergers/linear/parameters.json" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mergers.linear = mergeplug_plugins.mergers.linear" in entry_points
    # Installed from the wheel (not editable), the schemas load through importlib.resources.
    site = tmp_path / "site"
    assert run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]).returncode == 0
    code = ("import mergeplug, mergeplug.schema as s\n"
            "print(mergeplug.__file__.startswith(%r), s.load_schema('merge')['title'])" % str(site))
    result = run([sys.executable, "-c", code], {"PYTHONPATH": str(site)}, cwd=tmp_path)
    assert result.stdout.strip() == "True mergeplug merge recipe", result.stderr
