"""Parameter schedules (mergekit semantics) and the streaming safetensors writer, on hand-made values."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mergeplug import MergeplugError
from mergeplug.checkpoint import Checkpoint, ShardedWriter, parse_size
from mergeplug.schedule import depth, gradient, resolve_parameters, resolve_value

SCHEMA = {"properties": {"weight": {"type": "number"}, "k": {"type": "integer"}, "ids": {"type": "array"}}}


@pytest.mark.parametrize("values", [[0.0, 1.0], [0.2, 0.9, 0.1], [1.0, 3.0, 2.0, 5.0], [0.7]])
@pytest.mark.parametrize("t", [0.0, 0.1, 1 / 3, 0.5, 0.8, 1.0])
def test_gradient_is_np_interp_over_evenly_spaced_points(values, t):
    expected = float(np.interp(t, np.linspace(0, 1, len(values)), values))
    assert gradient(values, t) == pytest.approx(expected, abs=1e-12)


def test_depth_of_blocks_embeddings_and_head():
    assert [depth(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert depth(None, 5, before_blocks=True) == 0.0  # embeddings
    assert depth(None, 5) == 1.0  # final norm, lm_head
    assert depth(0, 1) == 1.0  # a single block, as mergekit


def test_filters_first_match_wins_with_fallback_and_nested_gradient():
    schedule = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.2},
                {"value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.9}]
    assert resolve_value(schedule, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert resolve_value(schedule, "model.layers.0.cross_attn.weight", 0.5) == 0.2
    assert resolve_value(schedule, "model.layers.3.mlp.up_proj.weight", 0.25) == 0.9
    assert resolve_value(schedule, "model.norm.weight", 0.25) == 0.25  # the fallback's gradient
    with pytest.raises(MergeplugError, match="no schedule entry matches tensor lm_head.weight"):
        resolve_value([{"filter": "mlp", "value": 1}], "lm_head.weight", 1.0, key="weight")


def test_resolve_parameters_uses_the_schema_to_tell_schedules_from_arrays():
    params = {"weight": [0.0, 1.0], "k": [1, 4], "ids": [1, 2, 3], "flag": True}
    assert resolve_parameters(params, SCHEMA, "x", 0.5) == {"weight": 0.5, "k": 2, "ids": [1, 2, 3], "flag": True}


def test_parse_size():
    assert (parse_size("5GB"), parse_size("2 MiB"), parse_size(123), parse_size("1.5KB")) == (5 * 10**9, 2 * 2**20, 123, 1500)
    with pytest.raises(MergeplugError, match="shard_size: '5 parsecs'"):
        parse_size("5 parsecs")


def test_sharded_writer_streams_aligned_shards_that_safetensors_and_checkpoint_read(tmp_path):
    tensors = {
        "a.bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "b.f32": torch.linspace(-1, 1, 5),
        "c.i64": torch.tensor([7, -8], dtype=torch.int64),
        "d.scalar": torch.tensor(3.5),
        "e.bool": torch.tensor([True, False, True]),
        "f.big": torch.randn(40, generator=torch.Generator().manual_seed(0)),
    }
    writer = ShardedWriter(tmp_path, [(n, t.shape, t.dtype) for n, t in tensors.items()], max_shard_bytes=40)
    assert sorted(writer.order) == sorted(tensors)
    with pytest.raises(RuntimeError, match="expected"):
        writer.write("not-next", torch.zeros(1))
    for name in writer.order:
        writer.write(name, tensors[name])
    files = writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert files[-1] == "model.safetensors.index.json" and set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in files[:-1]:
        with safe_open(str(tmp_path / shard), "pt") as handle:
            assert handle.metadata()["format"] == "pt"
            for name in handle.keys():
                torch.testing.assert_close(handle.get_tensor(name), tensors[name], rtol=0, atol=0)
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path, label="models[0]")
    assert {n: (i.shape, i.dtype) for n, i in checkpoint.tensors.items()} == {
        n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()}
    torch.testing.assert_close(checkpoint.get("f.big"), tensors["f.big"], rtol=0, atol=0)


def test_writer_refuses_a_result_of_the_wrong_shape(tmp_path):
    writer = ShardedWriter(tmp_path, [("w", (2, 3), "float32")], max_shard_bytes=10**6)
    with pytest.raises(MergeplugError, match=r"tensor w: merged result has shape \[3, 2\] float32, expected \[2, 3\] float32"):
        writer.write("w", torch.zeros(3, 2))
    writer.abort()
