"""``mergeplug new-plugin KIND NAME``: write a complete, installable plugin package.

The package is what a third-party plugin looks like: its own pyproject.toml with one entry point in group
``mergeplug``, one module registering one component, its parameter schema or data file, and a test that
passes as written. ``pip install -e DIR`` makes the component appear in ``mergeplug list``.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .errors import MergeplugError

SUPPORTED = ("merger", "family", "domain")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "mergeplug-{dist}"
version = "0.1.0"
description = "{description}"
requires-python = ">=3.10"
dependencies = ["mergeplug>={core_version}"]

[project.optional-dependencies]
test = ["pytest>=8"]

# One entry point in group "mergeplug" = one plugin; its name is what MERGEPLUG_DISABLE takes.
[project.entry-points.mergeplug]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]

[tool.setuptools.package-data]
{module} = ["*.json", "*.yaml", "*.jsonl"]
'''

README = '''\
# mergeplug-{dist}

A mergeplug {kind} plugin: {description}

    pip install -e .
    mergeplug list --kind {kind}
    mergeplug show {name}
    pytest tests
'''

MERGER_INIT = '''\
"""{title}: a mergeplug merger plugin. Registration only: the math lives in merger.py, imported on use."""
from pathlib import Path

from mergeplug import hookimpl

HERE = Path(__file__).parent


@hookimpl
def register_mergers(register):
    register(
        "{name}",
        "{module}.merger:{cls}",
        description="{description}",
        reference="arXiv:2212.04089",  # the paper of your method
        parameters=HERE / "parameters.json",
        model_parameters=HERE / "model_parameters.json",
        needs_base=True,
    )
'''

MERGER_MODULE = '''\
"""{title}.

As written: scaled task arithmetic (Ilharco et al., arXiv:2212.04089),
θ = θ_base + scale · Σ_i w_i (θ_i − θ_base). Replace ``merge`` with your method; keep it a pure function of
the tensors in ``inputs`` (see mergeplug.merging for the contract and shared primitives).
"""
import torch

from mergeplug.merging import Merger, TensorInputs, weighted_sum


class {cls}(Merger):
    needs_base = True

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        weights = inputs.weights("weight")
        delta = weighted_sum(inputs.task_vectors(), weights)
        return inputs.base + inputs.parameters["scale"] * delta
'''

MERGER_PARAMETERS = '''\
{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "scale": {"type": "number", "default": 1.0, "description": "Multiplies the summed task vectors (lambda of arXiv:2212.04089)."}
  }
}
'''

MERGER_MODEL_PARAMETERS = '''\
{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "weight": {"type": "number", "default": 1.0, "description": "This model's weight in the sum."}
  }
}
'''

MERGER_TEST = '''\
"""Tests of the {name} merger: registration through the real plugin manager and the formula by hand."""
import torch

from mergeplug.merging import TensorInputs
from mergeplug.plugins import Registry


def test_registered_and_formula():
    component = Registry().get("merger", "{name}")
    merger_cls = component.load()
    merger = merger_cls({{"scale": 0.5}})
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a, b = base + 1.0, base - torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    inputs = TensorInputs("w", base, [a, b], {{"scale": 0.5}}, [{{"weight": 1.0}}, {{"weight": 2.0}}])
    expected = base + 0.5 * (1.0 * (a - base) + 2.0 * (b - base))
    torch.testing.assert_close(merger.merge(inputs), expected)
'''

FAMILY_INIT = '''\
"""{title}: a mergeplug model-family plugin (what is special about the `{name}` architecture)."""
from mergeplug import hookimpl
from mergeplug.families import ModelFamily


class {cls}(ModelFamily):
    """Recognised from config.json's model_type; the defaults fit Llama-like tensor names."""

    name = "{name}"
    model_types = ("{name}",)
    layer_pattern = r"(?:^|\\.)layers\\.(\\d+)\\."
    embedding_names = ("model.embed_tokens.weight",)
    lm_head_names = ("lm_head.weight",)
    notes = ""


@hookimpl
def register_families(register):
    register("{name}", {cls}(), description="{description}", model_types=list({cls}.model_types))
'''

FAMILY_TEST = '''\
"""Tests of the {name} family: found through the real plugin manager and reads tensor names right."""
from mergeplug.families import family_for
from mergeplug.plugins import Registry


def test_family_is_picked_and_parses_layers():
    family = family_for({{"model_type": "{name}", "num_hidden_layers": 4}}, Registry())
    assert family.name == "{name}"
    assert family.num_layers({{"num_hidden_layers": 4}}) == 4
    assert family.layer_index("model.layers.3.self_attn.q_proj.weight") == 3
    assert family.layer_index("model.norm.weight") is None
    assert family.is_embedding("model.embed_tokens.weight")
'''

DOMAIN_INIT = '''\
"""{title}: a mergeplug domain plugin. The domain is data: domain.yaml (training set, benchmarks)."""
from pathlib import Path

from mergeplug import hookimpl


@hookimpl
def register_domains(register):
    register("{name}", Path(__file__).with_name("domain.yaml"), description="{description}")
'''

DOMAIN_YAML = '''\
# A mergeplug domain: checked against mergeplug's schemas/domain.schema.json.
name: {name}
description: {description}
role: capability                           # or base_ability: benchmarks kept for measuring forgetting
prompt_format: alpaca
training:
  - dataset: your-org/your-training-set   # a Hugging Face data set id, loaded when online
    split: train
    columns: {{instruction: question, response: answer}}   # our field: the data set's column
    sample: sample.jsonl                   # offline sample, in the data set's columns (your own rows)
benchmarks:
  - name: {name}_qa
    dataset: your-org/your-benchmark
    split: test
    columns: {{question: question, answer: answer}}
    sample: sample.jsonl
    prompt: "Q: {{question}}\\nA:"
    evaluator: exact_match
    evaluator_parameters: {{extract: [last_number]}}
    generation: {{max_new_tokens: 32, stop: ["\\n"]}}
    metric: exact_match_last_number
'''

DOMAIN_SAMPLE = '''\
{"question": "What is 2 + 3?", "answer": "5"}
{"question": "What is 7 - 4?", "answer": "3"}
'''

DOMAIN_TEST = '''\
"""Tests of the {name} domain: found through the real plugin manager, its data file is valid."""
from mergeplug.data import load_rows, render_prompt
from mergeplug.plugins import Registry


def test_domain_loads_and_sample_reads():
    domain = Registry().get("domain", "{name}").load()
    assert domain.name == "{name}"
    bench = domain.benchmarks[0]
    assert bench["evaluator"] == "exact_match"
    rows = load_rows(bench, offline=True).rows
    assert rows[0] == {{"question": "What is 2 + 3?", "answer": "5", "id": 0}}
    assert render_prompt(bench, rows[0]) == "Q: What is 2 + 3?\\nA:"
'''

FILES = {
    "merger": {"__init__.py": MERGER_INIT, "merger.py": MERGER_MODULE, "parameters.json": MERGER_PARAMETERS,
               "model_parameters.json": MERGER_MODEL_PARAMETERS, "tests": MERGER_TEST},
    "family": {"__init__.py": FAMILY_INIT, "tests": FAMILY_TEST},
    "domain": {"__init__.py": DOMAIN_INIT, "domain.yaml": DOMAIN_YAML, "sample.jsonl": DOMAIN_SAMPLE, "tests": DOMAIN_TEST},
}
LATER = {
    "evaluator": "`mergeplug evaluate` (the evaluate issue)",
    "finetuner": "`mergeplug finetune` (the finetune issue)",
    "aligner": "`mergeplug fuse` (the fuse issue)",
}


def write_plugin(kind: str, name: str, output: str | Path | None = None) -> Path:
    """Write the package for a ``kind`` component called ``name``; returns its folder."""
    if kind in LATER:
        raise MergeplugError(
            f"new-plugin {kind}: the {kind} contract arrives with {LATER[kind]}; supported now: {', '.join(SUPPORTED)}"
        )
    if kind not in FILES:
        raise MergeplugError(f"new-plugin: unknown kind {kind!r}; supported: {', '.join(SUPPORTED)}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise MergeplugError(f"new-plugin: name {name!r} must be lower case letters, digits and _, starting with a letter")
    folder = Path(output) if output else Path.cwd() / f"mergeplug-{name.replace('_', '-')}"
    if folder.exists() and any(folder.iterdir()):
        raise MergeplugError(f"new-plugin: {folder} already exists and is not empty; choose another -o folder")
    module = f"mergeplug_{name}"
    title = name.replace("_", " ").capitalize()
    values = {
        "name": name, "dist": name.replace("_", "-"), "module": module, "kind": kind, "title": title,
        "cls": "".join(p.capitalize() for p in name.split("_")) + {"merger": "Merger", "family": "Family", "domain": ""}[kind],
        "description": f"{title} ({kind}, written by mergeplug new-plugin)", "core_version": __version__,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent if folder.parent.exists() else None))
    try:
        (staging / module).mkdir()
        (staging / "tests").mkdir()
        (staging / "pyproject.toml").write_text(PYPROJECT.format(**values), encoding="utf-8")
        (staging / "README.md").write_text(README.format(**values), encoding="utf-8")
        for filename, template in FILES[kind].items():
            target = staging / "tests" / f"test_{name}.py" if filename == "tests" else staging / module / filename
            text = template if filename.endswith((".json", ".jsonl")) else template.format(**values)
            target.write_text(text, encoding="utf-8")
        if folder.exists():
            folder.rmdir()
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
