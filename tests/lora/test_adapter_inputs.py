"""LoRA adapter folders as merge inputs: each targeted tensor reads as W_base + scaling·B·A, so a merge with
the adapter equals the merge with its merge_and_unload-ed weights, and its task vector is the product."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergeplug import MergeplugError
from mergeplug.checkpoint import Checkpoint, LoraAdapter, is_lora_adapter, open_checkpoint
from mergeplug.engine import merge

PREFIX = "base_model.model."
BASES = {"a1": "base", "a2": "base", "rs": "base", "bias": "bias_base", "emb": "base", "vocab": "base", "g1": "g_base"}


def factors(adapter, module: str, kind: str = "lora") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of ``module`` as peft stored them."""
    a_key, b_key = ("lora_A.weight", "lora_B.weight") if kind == "lora" else ("lora_embedding_A", "lora_embedding_B")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        return handle.get_tensor(f"{PREFIX}{module}.{a_key}"), handle.get_tensor(f"{PREFIX}{module}.{b_key}")


def write_adapter(folder, config: dict, tensors: dict[str, torch.Tensor]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file({PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("name", sorted(BASES))
def test_every_tensor_reads_as_peft_merges_it(lora_zoo, read_model, name):
    adapter = open_checkpoint(lora_zoo[name], label="models[0]", base=Checkpoint(lora_zoo[BASES[name]], label="base"))
    merged = read_model(lora_zoo[f"{name}_merged"])
    assert isinstance(adapter, LoraAdapter) and set(adapter.names) == set(merged)
    for tensor, expected in merged.items():
        assert tuple(adapter.tensors[tensor].shape) == tuple(expected.shape), tensor
        torch.testing.assert_close(adapter.get(tensor), expected, rtol=0, atol=1e-6, msg=tensor)
    assert adapter.updates, "the adapter updates some tensor"


def test_task_vector_is_scaling_times_b_at_a(lora_zoo, write_recipe, tmp_path, read_model):
    recipe = write_recipe({"method": "task_arithmetic", "base_model": str(lora_zoo["base"]),
                           "models": [{"model": str(lora_zoo["a1"])}], "parameters": {"lambda": 1.0}})
    out = read_model(merge(recipe, tmp_path / "out"))
    base = read_model(lora_zoo["base"])
    a, b = factors(lora_zoo["a1"], "model.layers.1.mlp.up_proj")  # A (4, 32), B (64, 4); alpha 8, r 4
    assert a.shape == (4, 32) and b.shape == (64, 4)
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[name] - base[name], 2.0 * (b @ a), rtol=1e-5, atol=1e-6)
    # all-linear leaves norms and embeddings alone: their task vector is exactly zero
    for untouched in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight",
                      "model.layers.0.input_layernorm.weight"):
        assert torch.equal(out[untouched], base[untouched]), untouched


def test_rslora_scaling_is_alpha_over_sqrt_r_per_module(lora_zoo):
    adapter = open_checkpoint(lora_zoo["rs"], label="models[0]", base=Checkpoint(lora_zoo["base"], label="base"))
    base = Checkpoint(lora_zoo["base"], label="base")
    cases = {  # module -> alpha / sqrt(r), rank and alpha from rank_pattern / alpha_pattern
        "model.layers.0.self_attn.q_proj": 8 / math.sqrt(4),
        "model.layers.1.self_attn.q_proj": 3 / math.sqrt(4),
        "model.layers.0.self_attn.v_proj": 8 / math.sqrt(2),
    }
    for module, scaling in cases.items():
        a, b = factors(lora_zoo["rs"], module)
        assert a.shape[0] == (2 if "v_proj" in module else 4)
        assert adapter.updates[f"{module}.weight"].scaling == pytest.approx(scaling)
        delta = adapter.get(f"{module}.weight") - base.get(f"{module}.weight")
        torch.testing.assert_close(delta, scaling * (b @ a), rtol=1e-5, atol=1e-6)


def test_embedding_update_is_the_transposed_product(lora_zoo):
    adapter = open_checkpoint(lora_zoo["emb"], label="models[0]", base=Checkpoint(lora_zoo["base"], label="base"))
    a, b = factors(lora_zoo["emb"], "model.embed_tokens", kind="embedding")  # A (r, rows), B (dim, r)
    assert a.shape == (2, 256) and b.shape == (32, 2)
    with safe_open(str(lora_zoo["emb"] / "adapter_model.safetensors"), "pt") as handle:
        stored = handle.get_tensor(f"{PREFIX}model.embed_tokens.base_layer.weight")  # saved whole by peft
    torch.testing.assert_close(adapter.get("model.embed_tokens.weight"), stored + 2.0 * (b @ a).T, rtol=1e-5, atol=1e-6)


def test_fan_in_fan_out_transposes_the_product(lora_zoo, tmp_path):
    # GPT-2's Conv1D stores (in, out): the adapter's B @ A is (out, in) and is transposed onto it. Here a
    # Llama up_proj of shape (64, 32) stands in: A (2, 64), B (32, 2).
    a = torch.arange(128, dtype=torch.float32).reshape(2, 64) / 100
    b = torch.arange(64, dtype=torch.float32).reshape(32, 2) / 10
    folder = write_adapter(tmp_path / "conv1d", {"r": 2, "lora_alpha": 6, "fan_in_fan_out": True},
                           {"model.layers.0.mlp.up_proj.lora_A.weight": a, "model.layers.0.mlp.up_proj.lora_B.weight": b})
    base = Checkpoint(lora_zoo["base"], label="base")
    adapter = open_checkpoint(folder, label="models[0]", base=base)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(adapter.get(name), base.get(name) + 3.0 * (b @ a).T, rtol=1e-6, atol=1e-6)


def test_two_by_three_update_by_hand(tmp_path):
    # A hand-written 2x3 base weight and rank-1 adapter: W + (alpha/r)·B·A entry by entry.
    base_folder = tmp_path / "base"
    base_folder.mkdir()
    (base_folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    save_file({"layer.weight": w, "layer.bias": torch.tensor([0.5, -0.5])}, str(base_folder / "model.safetensors"))
    a, b = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[2.0], [3.0]])
    folder = write_adapter(tmp_path / "adapter", {"r": 1, "lora_alpha": 0.5, "base_model_name_or_path": str(base_folder)},
                           {"layer.lora_A.weight": a, "layer.lora_B.weight": b})
    adapter = open_checkpoint(folder, label="models[0]")  # base from adapter_config.json
    expected = torch.tensor([[1.0 + 1.0, 2.0, 3.0 - 1.0], [4.0 + 1.5, 5.0, 6.0 - 1.5]])
    torch.testing.assert_close(adapter.get("layer.weight"), expected)
    assert torch.equal(adapter.get("layer.bias"), torch.tensor([0.5, -0.5]))
    assert adapter.get("layer.weight").dtype == torch.float32


@pytest.mark.parametrize("method, parameters", [
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"lambda": 1.0, "density": 0.5}),
])
def test_merging_adapters_equals_merging_their_merged_weights(lora_zoo, write_recipe, tmp_path, read_model, method, parameters):
    def run(suffix: str):
        recipe = write_recipe({
            "method": method, "base_model": str(lora_zoo["base"]), "parameters": parameters,
            "models": [{"model": str(lora_zoo[f"a1{suffix}"])}, {"model": str(lora_zoo[f"a2{suffix}"])},
                       {"model": str(lora_zoo["ft"])}],
        }, name=f"recipe{suffix}.yaml")
        return read_model(merge(recipe, tmp_path / f"out{suffix}"))

    with_adapters, with_merged = run(""), run("_merged")
    assert set(with_adapters) == set(with_merged)
    for name, expected in with_merged.items():
        torch.testing.assert_close(with_adapters[name], expected, rtol=0, atol=1e-6, msg=name)
    base = read_model(lora_zoo["base"])
    assert not torch.equal(with_adapters["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("name, base, rows, tied", [("vocab", "base", 264, False), ("g1", "g_base", 256, True)])
def test_resized_vocabulary_and_tied_bases_merge_as_their_merged_weights(lora_zoo, write_recipe, tmp_path, read_model,
                                                                         name, base, rows, tied):
    # vocab: peft saved the resized 264-row embedding and lm_head whole, and the merge extends to them as for a
    # full checkpoint; g1: Gemma 2 ties lm_head to the embeddings, so no lm_head is written.
    outs = {}
    for suffix in ("", "_merged"):
        recipe = write_recipe({"method": "task_arithmetic", "base_model": str(lora_zoo[base]),
                               "models": [{"model": str(lora_zoo[name + suffix])}], "tokenizer_source": "models[0]",
                               "parameters": {"lambda": 0.5}}, name=f"{name}{suffix}.yaml")
        outs[suffix] = read_model(merge(recipe, tmp_path / f"{name}{suffix}"))
    assert set(outs[""]) == set(outs["_merged"])
    for tensor, expected in outs["_merged"].items():
        torch.testing.assert_close(outs[""][tensor], expected, rtol=0, atol=1e-6, msg=tensor)
    assert outs[""]["model.embed_tokens.weight"].shape[0] == rows
    assert ("lm_head.weight" not in outs[""]) is tied


def test_adapter_without_a_recipe_base_reads_over_its_configured_base(lora_zoo, write_recipe, tmp_path, read_model):
    recipe = write_recipe({"method": "linear", "models": [{"model": str(lora_zoo["a1"])}]})
    out = merge(recipe, tmp_path / "out")
    merged = read_model(lora_zoo["a1_merged"])
    result = read_model(out)
    assert set(result) == set(merged)
    for name, expected in merged.items():
        torch.testing.assert_close(result[name], expected, rtol=0, atol=1e-6, msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    # the adapter folder has no tokenizer: its base's is copied
    assert (out / "tokenizer.json").read_bytes() == (lora_zoo["base"] / "tokenizer.json").read_bytes()


def test_pickled_adapter_model_bin_reads_like_safetensors(lora_zoo, tmp_path, read_model):
    # older peft (or safe_serialization=False) writes adapter_model.bin; it is read with weights_only=True
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy2(lora_zoo["a2"] / "adapter_config.json", folder)
    torch.save(load_file(str(lora_zoo["a2"] / "adapter_model.safetensors")), folder / "adapter_model.bin")
    with pytest.warns(UserWarning, match=r"models\[0\] .*: reading adapter_model.bin \(pickle\) with weights_only=True"):
        adapter = open_checkpoint(folder, label="models[0]", base=Checkpoint(lora_zoo["base"], label="base"))
    merged = read_model(lora_zoo["a2_merged"])
    for name, expected in merged.items():
        torch.testing.assert_close(adapter.get(name), expected, rtol=0, atol=1e-6, msg=name)


def test_is_lora_adapter(lora_zoo):
    assert is_lora_adapter(lora_zoo["a1"]) and not is_lora_adapter(lora_zoo["a1_merged"])
    with pytest.raises(MergeplugError, match=r"is a LoRA adapter \(adapter_config.json, no config.json\); open it with"):
        Checkpoint(lora_zoo["a1"], label="models[0]")


# --- errors, all before any weight is read ---------------------------------------------------------------
def test_adapter_over_a_base_of_other_shapes_is_a_clear_error(lora_zoo, write_recipe, tmp_path):
    recipe = write_recipe({"method": "task_arithmetic", "base_model": str(lora_zoo["narrow"]),
                           "models": [{"model": str(lora_zoo["a1"])}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out")
    message = str(exc.value)
    assert message.startswith(f"models[0] ({lora_zoo['a1']}): B @ A of model.layers.0.mlp.down_proj has shape [32, 64], "
                              f"but model.layers.0.mlp.down_proj.weight of its base base ({lora_zoo['narrow']}) has [32, 48]")
    assert message.endswith("is this the adapter's base?")
    assert not (tmp_path / "out").exists()


def test_adapter_whose_base_does_not_open_is_a_clear_error(lora_zoo, write_recipe, tmp_path):
    folder = tmp_path / "orphan"
    shutil.copytree(lora_zoo["a1"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    recipe = write_recipe({"method": "linear", "models": [{"model": str(folder)}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out")
    assert str(exc.value) == (f"models[0] ({folder}): is a LoRA adapter and its base does not open: models[0]'s base "
                              f"({tmp_path / 'gone'}): no such model folder; name its base model with base_model in the recipe")
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(MergeplugError, match=r"names no base_model_name_or_path; name its base model with base_model"):
        merge(recipe, tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "sets use_dora: DoRA (arXiv:2402.09353) rescales every merged row by a learned magnitude"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights is 'pissa_niter_4', which trains against a modified copy"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'; only LoRA adapters (peft_type LORA) can be read as merge inputs"),
    ({"r": 8}, "LoRA factors of model.layers.0.mlp.down_proj have rank 4, but adapter_config.json gives r 8"),
    ({"rank_pattern": {"q_proj": 2}}, "LoRA factors of model.layers.0.self_attn.q_proj have rank 4, but adapter_config.json gives r 2"),
])
def test_unsupported_or_inconsistent_adapter_config_is_a_clear_error(lora_zoo, tmp_path, change, message):
    folder = tmp_path / "changed"
    shutil.copytree(lora_zoo["a1"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(MergeplugError) as exc:
        open_checkpoint(folder, label="models[1]", base=Checkpoint(lora_zoo["base"], label="base"))
    assert str(exc.value).startswith(f"models[1] ({folder}): ") and message in str(exc.value)


def test_broken_adapter_files_are_clear_errors(lora_zoo, tmp_path):
    base = Checkpoint(lora_zoo["base"], label="base")
    a = torch.zeros(2, 32)
    cases = {
        "no_weights": ({}, None, "is a LoRA adapter (adapter_config.json) without its weights: no "
                                 "adapter_model.safetensors or adapter_model.bin in"),
        "half": ({"r": 2, "lora_alpha": 2}, {"model.layers.0.self_attn.q_proj.lora_A.weight": a},
                 "the LoRA factors of model.layers.0.self_attn.q_proj are incomplete: it has no lora_B.weight"),
        "rank": ({"r": 2, "lora_alpha": 2}, {"model.layers.0.self_attn.q_proj.lora_A.weight": a,
                                              "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 3)},
                 "LoRA factors of model.layers.0.self_attn.q_proj disagree on the rank"),
        "missing_target": ({"r": 2, "lora_alpha": 2}, {"model.layers.7.self_attn.q_proj.lora_A.weight": a,
                                                        "model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)},
                           "the adapter updates model.layers.7.self_attn.q_proj.weight, which its base base"),
        "unknown": ({"r": 2, "lora_alpha": 2}, {"model.layers.0.self_attn.q_proj.lora_E": a},
                    "adapter tensor base_model.model.model.layers.0.self_attn.q_proj.lora_E is not a LoRA factor"),
    }
    for name, (config, tensors, message) in cases.items():
        folder = tmp_path / name
        if tensors is None:
            folder.mkdir()
            (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
        else:
            write_adapter(folder, config, tensors)
        with pytest.raises(MergeplugError) as exc:
            open_checkpoint(folder, label="models[0]", base=base)
        assert message in str(exc.value), name
