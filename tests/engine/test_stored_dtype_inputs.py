"""Mergers with ``stored_dtype_inputs`` (linear, task arithmetic, and the pruning family) get bfloat16 inputs as stored and add them
straight into a float32 accumulator: the merged bytes equal the float32 formula's, cast to bfloat16."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergeplug.engine import merge
from mergeplug.merging import weighted_sum
from mergeplug.plugins import Registry
from mergeplug.testing import make_tiny_model


def test_weighted_sum_of_bfloat16_inputs_into_float32_equals_converting_first():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 48, generator=gen).to(torch.bfloat16) for _ in range(3)]
    weights = torch.tensor([0.5, -0.25, 1.75])
    got = weighted_sum(tensors, weights, torch.float32)
    converted = [t.float() for t in tensors]
    expected = converted[0] * 0.5 + converted[1] * -0.25 + converted[2] * 1.75
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert weighted_sum(converted, weights).dtype == torch.float32  # no dtype: the first tensor's


@pytest.mark.filterwarnings("ignore:.*has no tokenizer files")
def test_linear_and_task_arithmetic_read_bfloat16_as_stored_and_merge_exactly(tmp_path, write_recipe, monkeypatch):
    base = make_tiny_model(tmp_path / "base", "llama", seed=0, dtype=torch.bfloat16)
    fts = [make_tiny_model(tmp_path / f"ft{i}", base=base, seed=i, dtype=torch.bfloat16) for i in (1, 2)]
    seen = {}
    for method in ("linear", "task_arithmetic", "model_stock"):
        cls = Registry().get("merger", method).load()
        original = cls.merge

        def spy(self, inputs, original=original, method=method):
            seen.setdefault(method, {t.dtype for t in [inputs.base, *inputs.models] if t is not None})
            return original(self, inputs)

        monkeypatch.setattr(cls, "merge", spy)
    assert Registry().get("merger", "linear").load().stored_dtype_inputs

    b, f1, f2 = (load_file(str(p / "model.safetensors")) for p in (base, *fts))
    models = [{"model": str(p)} for p in fts]
    out = merge(write_recipe({"method": "linear", "models": [{"model": str(fts[0]), "parameters": {"weight": 3.0}},
                                                              {"model": str(fts[1])}]}), tmp_path / "lin")
    merged = load_file(str(out / "model.safetensors"))
    for name in b:
        expected = ((f1[name].float() * 3.0 + f2[name].float()) / 4.0).to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16 and torch.equal(merged[name], expected), name

    out = merge(write_recipe({"method": "task_arithmetic", "base_model": str(base), "models": models,
                              "parameters": {"lambda": 0.5}}, "ta.yaml"), tmp_path / "ta")
    merged = load_file(str(out / "model.safetensors"))
    for name in b:
        expected = (b[name].float() * (1 - 2 * 0.5) + f1[name].float() * 0.5 + f2[name].float() * 0.5).to(torch.bfloat16)
        assert torch.equal(merged[name], expected), name

    merge(write_recipe({"method": "model_stock", "base_model": str(base), "models": models}, "ms.yaml"),
          tmp_path / "model_stock")  # a merger without stored_dtype_inputs: converted
    assert seen == {"linear": {torch.bfloat16}, "task_arithmetic": {torch.bfloat16},
                    "model_stock": {torch.float32}}
