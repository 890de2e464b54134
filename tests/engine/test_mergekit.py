"""mergekit YAML recipes are accepted as they are: conversion, merging, and one-line refusals."""
from __future__ import annotations

import hashlib

import pytest

from mergeplug import MergeplugError
from mergeplug.engine import merge
from mergeplug.mergekit import convert_mergekit
from mergeplug.recipe import DIALECTS, load_recipe
from mergeplug.plugins import Registry

TIES = """\
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {ft1}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {ft2}
    parameters:
      density: [0.3, 0.7]
      weight: 0.3
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_the_dialect_is_registered():
    assert (DIALECTS[0][0]({"merge_method": "ties"}), DIALECTS[0][0]({"method": "ties"})) == (True, False)


def test_a_mergekit_ties_config_converts_and_merges_like_the_native_recipe(zoo, write_recipe, tmp_path):
    text = TIES.format(base=zoo["base"], ft1=zoo["ft1"], ft2=zoo["ft2"])
    path = tmp_path / "mergekit.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.data["method"] == "ties" and recipe.data["dtype"] == "float16"
    assert [m["model"] for m in recipe.data["models"]] == [str(zoo["ft1"]), str(zoo["ft2"])]  # base dropped
    assert recipe.data["models"][1]["parameters"]["density"] == [0.3, 0.7]
    assert recipe.data["parameters"]["normalize"] is True and "int8_mask" not in recipe.data["parameters"]

    native = write_recipe({"method": "ties", "base_model": str(zoo["base"]), "dtype": "float16",
                           "parameters": {"normalize": True}, "models": [
                               {"model": str(zoo["ft1"]), "parameters": {"density": 0.5, "weight": 0.5}},
                               {"model": str(zoo["ft2"]), "parameters": {"density": [0.3, 0.7], "weight": 0.3}}]})
    out_mk, out_native = merge(path, tmp_path / "mk"), merge(native, tmp_path / "native")
    assert digest(out_mk) == digest(out_native)
    assert "merge_method: ties" in (out_mk / "README.md").read_text()  # the card holds the recipe as written


def test_conversion_of_dtypes_tokenizer_della_epsilon_and_chat_template():
    data = {"merge_method": "della", "base_model": "org/base", "dtype": "float32", "out_dtype": "bfloat16",
            "tokenizer": {"source": "org/math"}, "chat_template": "chatml",
            "parameters": {"lambda": 1.0, "epsilon": [{"filter": "mlp", "value": 0.05}, {"value": 0.1}]},
            "models": [{"model": "org/base"}, {"model": "org/math", "parameters": {"epsilon": 0.07, "weight": 1}}]}
    with pytest.warns(UserWarning, match="chat_template: ignored"):
        out = convert_mergekit(data, "m.yaml")
    assert out == {"kind": "merge", "method": "della", "base_model": "org/base", "dtype": "bfloat16",
                   "tokenizer_source": "org/math",
                   "parameters": {"lambda": 1.0, "epsilon": [{"filter": "mlp", "value": 0.1}, {"value": 0.2}]},
                   "models": [{"model": "org/math", "parameters": {"epsilon": 0.14, "weight": 1}}]}
    linear = convert_mergekit({"merge_method": "linear", "base_model": "a/b", "tokenizer_source": "base",
                               "models": [{"model": "a/b"}, {"model": "c/d"}]}, "m.yaml")
    assert [m["model"] for m in linear["models"]] == ["a/b", "c/d"] and linear["tokenizer_source"] == "base"


@pytest.mark.parametrize("data, line", [
    ({"merge_method": "nuslerp", "models": [{"model": "a/b"}]},
     "m.yaml: merge_method: mergekit's 'nuslerp' is not supported by mergeplug; supported: linear, task_arithmetic, "
     "ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, multislerp, "
     "model_stock, sce"),
    ({"merge_method": "passthrough", "slices": []},
     "m.yaml: slices: mergekit's 'slices' is not supported by mergeplug (layer slicing (passthrough / "
     "frankenmerges)); supported keys: base_model, chat_template, dtype, merge_method, models, out_dtype, "
     "parameters, tokenizer, tokenizer_source"),
    ({"merge_method": "linear", "models": [{"model": "a/b"}], "tokenizer_source": "union"},
     "m.yaml: tokenizer_source: mergekit's 'union' (a merged vocabulary) is not supported by mergeplug; use base "
     "or one of the models"),
    ({"merge_method": "linear", "models": [{"model": "a/b+c/lora"}]},
     "m.yaml: models[0].model: mergekit's 'model+lora' reference 'a/b+c/lora' is not supported; merge the adapter "
     "into its base first"),
    ({"merge_method": "linear", "models": [{"model": "a/b"}], "tokenizer": {"source": "base", "tokens": {}}},
     "m.yaml: tokenizer.tokens: mergekit's tokenizer.tokens (added tokens, padding) is not supported by mergeplug; "
     "remove it"),
])
def test_unsupported_mergekit_features_are_named(data, line):
    with pytest.raises(MergeplugError) as exc:
        convert_mergekit(data, "m.yaml")
    assert exc.value.problems == [line]


def test_cli_accepts_a_mergekit_linear_config(zoo, tmp_path, use_registry):
    from click.testing import CliRunner

    from mergeplug.cli import cli

    use_registry(Registry())
    path = tmp_path / "mk.yaml"
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {zoo['ft1']}\n    parameters: {{weight: 1.0}}\n"
                    f"  - model: {zoo['ft2']}\n    parameters: {{weight: 1.0}}\ndtype: bfloat16\n")
    result = CliRunner().invoke(cli, ["merge", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file
    import torch

    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    a, b = (load_file(str(zoo[k] / "model.safetensors")) for k in ("ft1", "ft2"))
    name = "model.layers.1.self_attn.v_proj.weight"
    assert merged[name].dtype == torch.bfloat16
    torch.testing.assert_close(merged[name], ((a[name] + b[name]) / 2).to(torch.bfloat16), rtol=0, atol=0)
