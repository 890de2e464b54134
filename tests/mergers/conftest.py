"""Shared fixtures for merger plugin tests.

Every fixture goes through the real plugin manager (``mergeplug.plugins.Registry``), so a test exercises the
component exactly as a recipe would: the class the entry point registers, with the defaults its JSON schemas
declare.

- ``registry``: the installed plugins, loaded once per session.
- ``make_merger(name, **parameters)``: the registered merger class, instantiated with its global defaults
  overridden by ``parameters``.
- ``make_inputs(name, base, models, parameters=None, model_parameters=None, tensor="...", seed=0)``: a
  ``TensorInputs`` with the merger's global and per-model defaults filled in (``model_parameters``: one dict for
  every model, or a list with one dict per model).
- ``check_registration(name)``: asserts the component's registration is sound (loads, ``needs_base`` agrees,
  schemas are valid and shaped as the core requires) and returns the class.
- ``tiny_checkpoints``: three hand-written Llama-named checkpoints (``base``, ``ft1``, ``ft2``) of a few hundred
  parameters; ``.root`` is their folder and ``.tensors[role][tensor name]`` their weights.
- ``merge_checkpoints(method, parameters=None, model_parameters=None, seed=0)``: runs the real merge engine on
  them (base + ft1 + ft2) and returns the merged tensors by name.
- ``assert_engine_matches(method, ...)``: the engine's output equals the merger applied to each tensor by hand.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from mergeplug.plugins import Registry
from mergeplug.schema import check_schema, defaults, load_schema, problems

DEFAULT_TENSOR = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry()


@pytest.fixture
def make_merger(registry):
    def make(name: str, **parameters):
        component = registry.get("merger", name)
        return component.load()({**defaults(component.parameters), **parameters})

    return make


@pytest.fixture
def make_inputs(registry):
    from mergeplug.merging import TensorInputs

    def make(name, base, models, parameters=None, model_parameters=None, tensor=DEFAULT_TENSOR, seed=0):
        component = registry.get("merger", name)
        per_model = model_parameters if isinstance(model_parameters, list) else [model_parameters or {}] * len(models)
        model_defaults = defaults(component.model_parameters or {})
        return TensorInputs(
            name=tensor,
            base=base,
            models=list(models),
            parameters={**defaults(component.parameters), **(parameters or {})},
            model_parameters=[{**model_defaults, **p} for p in per_model],
            seed=seed,
            model_names=[f"model{i}" for i in range(len(models))],
        )

    return make


@pytest.fixture
def check_registration(registry):
    from mergeplug.merging import Merger

    shape = load_schema("component-parameters")

    def check(name: str):
        component = registry.get("merger", name)
        cls = component.load()
        assert isinstance(cls, type) and issubclass(cls, Merger)
        assert component.reference and component.reference.startswith("arXiv:")
        assert component.extra.get("needs_base") is cls.needs_base, "needs_base: class and registration disagree"
        for schema in (component.parameters, component.model_parameters):
            assert schema is not None
            assert check_schema(schema) == []
            assert problems(schema, shape, source=name) == []
            for key, prop in schema["properties"].items():
                assert "default" in prop or key in schema.get("required", []), f"{name}: {key} has no default"
        return cls

    return check


TINY_SHAPES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.layers.1.mlp.up_proj.weight": (12, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (16, 8),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    gen = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=gen) for name, shape in TINY_SHAPES.items()}
    tensors = {"base": base}
    for role in ("ft1", "ft2"):
        tensors[role] = {name: t + 0.1 * torch.randn(t.shape, generator=gen) for name, t in base.items()}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
              "vocab_size": 16, "hidden_size": 8, "torch_dtype": "float32"}
    for role, weights in tensors.items():
        (root / role).mkdir()
        save_file(weights, str(root / role / "model.safetensors"), metadata={"format": "pt"})
        (root / role / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return SimpleNamespace(root=Path(root), tensors=tensors)


@pytest.fixture
def merge_checkpoints(tiny_checkpoints, tmp_path, registry):
    from safetensors.torch import load_file

    from mergeplug.engine import merge
    from mergeplug.recipe import check_recipe

    def run(method, parameters=None, model_parameters=None, seed=0):
        root = tiny_checkpoints.root
        models = [{"model": str(root / role)} for role in ("ft1", "ft2")]
        for entry, own in zip(models, model_parameters or [None, None]):
            if own:
                entry["parameters"] = own
        recipe = check_recipe({"method": method, "base_model": str(root / "base"), "models": models,
                               "parameters": parameters or {}, "seed": seed}, source="recipe.yaml", registry=registry)
        out = Path(tempfile.mkdtemp(dir=tmp_path)) / "merged"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tokenizer.*")
            merge(recipe, out, progress=False, registry=registry)
        return load_file(str(out / "model.safetensors"))

    return run


@pytest.fixture
def assert_engine_matches(tiny_checkpoints, merge_checkpoints, make_merger, make_inputs):
    from torch.testing import assert_close

    def check(method, parameters=None, model_parameters=None, seed=0):
        merged = merge_checkpoints(method, parameters, model_parameters, seed)
        assert set(merged) == set(TINY_SHAPES)
        merger = make_merger(method, **(parameters or {}))
        weights = tiny_checkpoints.tensors
        for name, out in merged.items():
            inputs = make_inputs(method, weights["base"][name], [weights["ft1"][name], weights["ft2"][name]],
                                 parameters, model_parameters, tensor=name, seed=seed)
            assert_close(out, merger.merge(inputs), msg=f"{method}: {name}")
        return merged

    return check
