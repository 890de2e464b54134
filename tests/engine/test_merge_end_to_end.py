"""End-to-end merges of tiny checkpoints: values against the formula, reloading, shards, schedules, vocabularies."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from mergeplug import MergeplugError
from mergeplug.engine import merge
from mergeplug.plugins import Registry


def load(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (sharded or not), through safetensors."""
    folder = Path(folder)
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def test_linear_merge_of_base_and_two_finetunes_equals_the_formula(zoo, write_recipe, tmp_path):
    recipe = write_recipe({"method": "linear", "models": [
        {"model": str(zoo["base"]), "parameters": {"weight": 0.5}},
        {"model": str(zoo["ft1"]), "parameters": {"weight": 0.3}},
        {"model": str(zoo["ft2"]), "parameters": {"weight": 0.2}},
    ]})
    out = merge(recipe, tmp_path / "out")
    merged, base, ft1, ft2 = load(out), load(zoo["base"]), load(zoo["ft1"]), load(zoo["ft2"])
    assert set(merged) == set(base)
    for name in base:
        expected = 0.5 * base[name] + 0.3 * ft1[name] + 0.2 * ft2[name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)
        assert merged[name].dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").read_bytes() == (zoo["tokenizer"] / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_task_arithmetic_merge_equals_base_plus_scaled_task_vectors(zoo, write_recipe, tmp_path):
    from mergeplug.plugins import Registry

    props = Registry().get("merger", "task_arithmetic").parameters["properties"]
    scale_key = next(k for k in ("lambda", "scaling", "scale") if k in props)
    recipe = write_recipe({"method": "task_arithmetic", "base_model": str(zoo["base"]),
                           "parameters": {scale_key: 0.4},
                           "models": [{"model": str(zoo["ft1"])}, {"model": str(zoo["ft2"])}]})
    merged, base, ft1, ft2 = load(merge(recipe, tmp_path / "out")), load(zoo["base"]), load(zoo["ft1"]), load(zoo["ft2"])
    for name in base:
        expected = base[name] + 0.4 * ((ft1[name] - base[name]) + (ft2[name] - base[name]))
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_gemma2_tied_merge_reloads_and_generates(zoo, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe({"method": "linear", "dtype": "bfloat16", "models": [
        {"model": str(zoo["g_base"])}, {"model": str(zoo["g_ft1"])}, {"model": str(zoo["g_ft2"])}]})
    out = merge(recipe, tmp_path / "gemma")
    merged = load(out)
    assert "lm_head.weight" not in merged  # tied: not invented
    parts = [load(zoo[k]) for k in ("g_base", "g_ft1", "g_ft2")]
    emb = "model.embed_tokens.weight"
    expected = (sum(p[emb] for p in parts) / 3).to(torch.bfloat16)
    assert merged[emb].dtype == torch.bfloat16
    torch.testing.assert_close(merged[emb], expected, rtol=0, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight)
    torch.testing.assert_close(model.model.embed_tokens.weight, expected.float())
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("Question: what is", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


def test_sharded_input_and_output_round_trip(zoo, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe({"method": "linear", "shard_size": "12KB", "models": [
        {"model": str(zoo["base"])}, {"model": str(zoo["ft1_sharded"])}]})
    out = merge(recipe, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load(out).values())
    for shard in shards:  # at most 12 kB of data each, unless one tensor alone is larger
        with safe_open(str(shard), "pt") as handle:
            sizes = [handle.get_tensor(k).numel() * 4 for k in handle.keys()]
        assert sum(sizes) <= 12_000 or len(sizes) == 1
    assert len(list(zoo["ft1_sharded"].glob("model-*.safetensors"))) > 1
    merged, base, ft1 = load(out), load(zoo["base"]), load(zoo["ft1"])
    for name in base:
        torch.testing.assert_close(merged[name], (base[name] + ft1[name]) / 2, rtol=1e-6, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, merged["model.layers.1.mlp.up_proj.weight"])


def test_per_layer_gradient_and_filter_schedules(zoo, write_recipe, tmp_path):
    # Three layers make the interpolation visible (t = 0, 0.5, 1). models[1]'s weight rises from 0 (first block,
    # and the embeddings at t=0) to 1 (last block, final norm and lm_head at t=1); models[0]'s weight is 0 for
    # MLP tensors and falls from 1 to 0 elsewhere.
    from mergeplug.testing import make_tiny_model

    base = make_tiny_model(tmp_path / "b3", "llama", seed=0, num_layers=3)
    ft = make_tiny_model(tmp_path / "f3", base=base, seed=1)
    recipe = write_recipe({"method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": str(base), "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": [1.0, 0.0]}]}},
        {"model": str(ft), "parameters": {"weight": [0.0, 1.0]}},
    ]})
    merged, b, f = load(merge(recipe, tmp_path / "out")), load(base), load(ft)

    def expected_weights(name):
        match = re.search(r"layers\.(\d+)\.", name)
        t = int(match.group(1)) / 2 if match else (0.0 if "embed" in name else 1.0)
        return (0.0 if "mlp" in name else 1.0 - t), t

    for name in b:
        w_base, w_ft = expected_weights(name)
        torch.testing.assert_close(merged[name], w_base * b[name] + w_ft * f[name], rtol=1e-6, atol=1e-6)
    name = "model.layers.1.self_attn.q_proj.weight"  # t = 0.5: half of each
    torch.testing.assert_close(merged[name], 0.5 * b[name] + 0.5 * f[name], rtol=1e-6, atol=1e-6)


def test_same_recipe_and_seed_give_identical_bytes(zoo, write_recipe, tmp_path):
    data = {"method": "dare_ties", "base_model": str(zoo["base"]), "seed": 7,
            "models": [{"model": str(zoo["ft1"])}, {"model": str(zoo["ft2"])}]}
    recipe = write_recipe(data)
    digests = []
    for out in (tmp_path / "a", tmp_path / "b"):
        merge(recipe, out)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())})
    assert digests[0] == digests[1]
    assert "model.safetensors" in digests[0]


def test_a_merge_gives_torch_its_threads_back_after_lending_them_to_the_kernels(zoo, write_recipe, tmp_path,
                                                                             monkeypatch):
    from mergeplug import native

    if native.library() is None:
        pytest.skip("no fused kernels here")
    seen = []
    real = native.threads
    monkeypatch.setattr(native, "threads", lambda: (real(), seen.append(torch.get_num_threads()))[0])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merge(write_recipe({"method": "dare_ties", "base_model": str(zoo["base"]),
                            "models": [{"model": str(zoo["ft1"])}, {"model": str(zoo["ft2"])}]}), tmp_path / "out")
        assert seen and set(seen) == {1}  # the kernels ran, with torch at one thread meanwhile
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_vocab_extend_takes_extra_rows_from_the_tokenizer_source(zoo, write_recipe, tmp_path):
    # ft_vocab has 264 embedding rows, the base 256: the first 256 are merged, the last 8 are ft_vocab's.
    recipe = write_recipe({"method": "linear", "base_model": str(zoo["base"]), "tokenizer_source": str(zoo["ft_vocab"]),
                           "models": [{"model": str(zoo["ft1"])}, {"model": str(zoo["ft_vocab"])}]})
    merged, ft1, ftv = load(merge(recipe, tmp_path / "out")), load(zoo["ft1"]), load(zoo["ft_vocab"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == (264, 32)
        torch.testing.assert_close(merged[name][:256], (ft1[name] + ftv[name][:256]) / 2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged[name][256:], ftv[name][256:], rtol=0, atol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 264


def test_vocab_extend_with_base_tokenizer_truncates_to_the_base_rows(zoo, write_recipe, tmp_path):
    recipe = write_recipe({"method": "linear", "base_model": str(zoo["base"]),
                           "models": [{"model": str(zoo["ft1"])}, {"model": str(zoo["ft_vocab"])}]})
    merged, ft1, ftv = load(merge(recipe, tmp_path / "out")), load(zoo["ft1"]), load(zoo["ft_vocab"])
    name = "model.embed_tokens.weight"
    assert merged[name].shape == (256, 32)
    torch.testing.assert_close(merged[name], (ft1[name] + ftv[name][:256]) / 2, rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 256


def test_embeddings_base_keeps_the_base_embeddings_and_lm_head(zoo, write_recipe, tmp_path):
    recipe = write_recipe({"method": "linear", "base_model": str(zoo["base"]), "embeddings": "base",
                           "models": [{"model": str(zoo["ft1"])}, {"model": str(zoo["ft2"])}]})
    merged, base, ft1, ft2 = load(merge(recipe, tmp_path / "out")), load(zoo["base"]), load(zoo["ft1"]), load(zoo["ft2"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[name], base[name], rtol=0, atol=0)
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name], (ft1[name] + ft2[name]) / 2, rtol=1e-6, atol=1e-6)


def test_model_card_front_matter_is_yaml_and_holds_the_recipe(zoo, write_recipe, tmp_path):
    data = {"method": "linear", "name": "tiny soup", "base_model": "acme/base-model-that-is-not-local",
            "models": [{"model": str(zoo["ft1"])}, {"model": str(zoo["ft2"])}]}
    recipe = write_recipe({**data, "base_model": str(zoo["base"])})
    card = (merge(recipe, tmp_path / "out") / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    front = yaml.safe_load(match.group(1))
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["merge", "mergeplug"]
    assert "base_model" not in front  # local folders are not hub ids: kept out of the hub's metadata
    assert front["mergeplug"]["method"] == "linear"
    assert front["mergeplug"]["base_model"] == str(zoo["base"])
    assert front["mergeplug"]["models"] == [m["model"] for m in data["models"]]
    assert card.count("# tiny soup") == 1
    block = re.search(r"```yaml\n(.*?)```", card, re.S).group(1)
    assert yaml.safe_load(block) == yaml.safe_load(recipe.read_text())

    from mergeplug.engine import model_card

    class Stub:  # the card of a plan whose models are hub ids lists them as base_model
        def __init__(self, ref, label):
            self.ref, self.label = ref, label

    plan = type("P", (), {})()
    plan.recipe = type("R", (), {"data": data, "path": None, "components": {
        "method": Registry().get("merger", "linear")}})()
    plan.base = Stub("acme/base", "base")
    plan.models = [Stub("acme/math", "models[0]"), Stub("acme/code", "models[1]")]
    plan.inputs = [plan.base, *plan.models]
    front = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", model_card(plan), re.S).group(1))
    assert front["base_model"] == ["acme/base", "acme/math", "acme/code"]
    assert front["base_model_relation"] == "merge"


def tied_copy(source: Path, folder: Path) -> Path:
    """A copy of an untied Llama folder saved as a tied one: no lm_head.weight, tie_word_embeddings true."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_lm_head_present_in_some_models_only(zoo, write_recipe, tmp_path):
    tied = tied_copy(zoo["ft1"], tmp_path / "tied")
    base, ft1 = load(zoo["base"]), load(zoo["ft1"])
    # The reference has lm_head: the tied model contributes its embedding matrix as its output layer.
    recipe = write_recipe({"method": "linear", "models": [{"model": str(zoo["base"])}, {"model": str(tied)}]})
    merged = load(merge(recipe, tmp_path / "untied_out"))
    torch.testing.assert_close(merged["lm_head.weight"], (base["lm_head.weight"] + ft1["model.embed_tokens.weight"]) / 2)
    # The reference is tied: no lm_head is invented, the other model's own lm_head is ignored with a warning.
    recipe = write_recipe({"method": "linear", "models": [{"model": str(tied)}, {"model": str(zoo["base"])}]}, "r2.yaml")
    with pytest.warns(UserWarning, match=r"models\[1\] .*has its own lm_head.weight, but models\[0\] ties it"):
        merged = load(merge(recipe, tmp_path / "tied_out"))
    assert "lm_head.weight" not in merged
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(merged[emb], (ft1[emb] + base[emb]) / 2)


@pytest.mark.parametrize("method", Registry().names("merger"))
def test_every_installed_merger_runs_through_the_engine(method, zoo, write_recipe, tmp_path, monkeypatch):
    models = [{"model": str(zoo["ft1"])}] + ([] if method == "slerp" else [{"model": str(zoo["ft2"])}])
    extra = {}
    if getattr(Registry().get("merger", method).load(), "statistic", None):
        # A data-aware merger: each model's own domain data (the offline sample), a private cache, few samples.
        for m in models:
            m["domain"] = "math"
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.setenv(name, "1")
        monkeypatch.setenv("MERGEPLUG_CACHE", str(tmp_path / "cache"))
        extra = {"parameters": {"samples": 2, "max_length": 400}}
    recipe = write_recipe({"method": method, "base_model": str(zoo["base"]), "models": models, "seed": 1, **extra})
    merged, base = load(merge(recipe, tmp_path / "out")), load(zoo["base"])
    assert {n: t.shape for n, t in merged.items()} == {n: t.shape for n, t in base.items()}
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    assert any(not torch.equal(merged[n], base[n]) for n in base)  # the finetunes moved something


def test_a_recipe_built_in_python_resolves_relative_models_against_its_path(zoo, tmp_path):
    """check_recipe(path=) does for a dict what load_recipe does for a file: relative model paths are read
    against the recipe's folder, not the working folder."""
    from mergeplug.recipe import check_recipe

    data = {"method": "linear", "models": [{"model": "ft1"}, {"model": "ft2"}]}
    recipe = check_recipe(data, source="built in Python", path=zoo["ft1"].parent / "recipe.yaml")
    assert recipe.path == zoo["ft1"].parent / "recipe.yaml"
    merged, ft1, ft2 = load(merge(recipe, tmp_path / "out")), load(zoo["ft1"]), load(zoo["ft2"])
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (ft1[name] + ft2[name]) / 2, rtol=1e-6, atol=1e-6)
    with pytest.raises(MergeplugError, match="ft1"):  # without a path: the working folder, where ft1 is not
        merge(check_recipe(data, source="built in Python"), tmp_path / "out2")
