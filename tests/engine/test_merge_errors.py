"""Bad input stops the merge with one line naming the model and tensor; interruptions leave OUT as it was."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from mergeplug import MergeplugError, hookimpl
from mergeplug.engine import merge
from mergeplug.merging import Merger
from mergeplug.plugins import Registry


def one_line(exc_info) -> str:
    problems = exc_info.value.problems
    assert len(problems) == 1 and "\n" not in problems[0]
    return problems[0]


def two_models(zoo, **extra):
    return {"method": "linear", "models": [{"model": str(zoo["base"])}, {"model": str(zoo["ft1"])}], **extra}


def test_missing_model_folder(zoo, write_recipe, tmp_path):
    recipe = write_recipe({"method": "linear", "models": [{"model": str(zoo["base"])}, {"model": "./no/such/model"}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out")
    assert one_line(exc) == "models[1] (./no/such/model): no such model folder"
    assert not (tmp_path / "out").exists()


def test_hub_id_that_cannot_be_fetched_offline(zoo, write_recipe, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    recipe = write_recipe({"method": "linear", "models": [{"model": str(zoo["base"])}, {"model": "acme/not-here-7"}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out")
    line = one_line(exc)
    assert line.startswith("models[1] (acme/not-here-7): no such local folder, and fetching it from the Hugging Face Hub failed")


def test_shape_mismatch_names_model_and_tensor(zoo, write_recipe, tmp_path):
    recipe = write_recipe({"method": "linear", "models": [{"model": str(zoo["base"])}, {"model": str(zoo["ft1"])},
                                                          {"model": str(zoo["narrow"])}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out")
    assert one_line(exc) == (f"models[2] ({zoo['narrow']}): tensor model.layers.0.mlp.down_proj.weight has shape "
                             f"[32, 48], models[0] has [32, 64]")


def test_architecture_mismatch(zoo, write_recipe, tmp_path):
    recipe = write_recipe({"method": "linear", "base_model": str(zoo["base"]), "models": [{"model": str(zoo["mistral"])}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out")
    assert one_line(exc) == (f"models[0] ({zoo['mistral']}): config.json model_type is 'mistral', base has 'llama'; "
                             f"models merged in parameter space must share one architecture")


def test_vocab_policy_error_stops_on_a_row_mismatch(zoo, write_recipe, tmp_path):
    recipe = write_recipe({"method": "linear", "base_model": str(zoo["base"]), "vocab_policy": "error",
                           "models": [{"model": str(zoo["ft1"])}, {"model": str(zoo["ft_vocab"])}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out")
    assert one_line(exc) == (f"models[1] ({zoo['ft_vocab']}): tensor lm_head.weight has 264 rows, base has 256; "
                             f"vocab_policy is error (use vocab_policy: extend to merge the shared rows)")


def test_existing_output_is_refused_without_force(zoo, write_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeplugError) as exc:
        merge(write_recipe(two_models(zoo)), out)
    assert one_line(exc) == f"{out}: already exists; pass --force to replace it (replaced only once the new merge is complete)"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_replaces_an_existing_output_once_complete(zoo, write_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    merge(write_recipe(two_models(zoo)), out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]


def test_invalid_recipe_is_reported_before_any_model_is_opened(zoo, write_recipe, tmp_path):
    recipe = write_recipe({"method": "linear", "models": [{"model": "./missing", "parameters": {"wieght": 1}}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out")
    assert "models[0].parameters: unknown field 'wieght' (did you mean 'weight'?)" in one_line(exc)


class NeedsBase(Merger):
    needs_base = True

    def merge(self, inputs):
        return inputs.base


class Boom(Merger):
    """Raises on the third tensor it merges: RuntimeError, or KeyboardInterrupt (set by the test)."""

    needs_base = False
    error: BaseException = RuntimeError("kaboom")
    calls = 0

    def merge(self, inputs):
        type(self).calls += 1
        if type(self).calls == 3:
            raise type(self).error
        return inputs.models[0]


class TestPlugin:
    @hookimpl
    def register_mergers(self, register):
        register("needs_base_test", NeedsBase, description="Returns the base.")
        register("boom_test", Boom, description="Raises on the third tensor.")


@pytest.fixture
def registry():
    return Registry(plugins=[("engine_test", TestPlugin())])


def test_merger_that_needs_a_base_without_one(zoo, write_recipe, tmp_path, registry):
    recipe = write_recipe({"method": "needs_base_test", "models": [{"model": str(zoo["ft1"])}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out", registry=registry)
    assert one_line(exc) == "recipe.yaml: base_model: merger 'needs_base_test' needs a base_model (it merges task vectors)"


@pytest.mark.parametrize("error", [RuntimeError("kaboom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_interrupted_merge_leaves_output_as_it_was(zoo, write_recipe, tmp_path, registry, monkeypatch, error, existing):
    monkeypatch.setattr(Boom, "calls", 0)
    monkeypatch.setattr(Boom, "error", error)
    out = tmp_path / "out"
    if existing:
        shutil.copytree(zoo["base"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    recipe = write_recipe({"method": "boom_test", "models": [{"model": str(zoo["ft1"])}], "shard_size": "10KB"})
    with pytest.raises(MergeplugError if isinstance(error, RuntimeError) else KeyboardInterrupt) as exc:
        merge(recipe, out, force=True, registry=registry)
    if isinstance(error, RuntimeError):
        assert one_line(exc).startswith("merger 'boom_test' failed on tensor ")
        assert one_line(exc).endswith(": RuntimeError: kaboom")
    assert Boom.calls == 3
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "recipe.yaml"] if existing else ["recipe.yaml"])


def test_lora_adapter_folder_without_weights_is_a_clear_error(zoo, write_recipe, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA",
                                                             "base_model_name_or_path": str(zoo["base"])}))
    recipe = write_recipe({"method": "linear", "models": [{"model": str(zoo["base"])}, {"model": str(adapter)}]})
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out")
    assert "is a LoRA adapter (adapter_config.json) without its weights: no adapter_model.safetensors" in one_line(exc)
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_a_clear_error_and_auto_falls_back_to_cpu(zoo, write_recipe, tmp_path):
    recipe = write_recipe(two_models(zoo))
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(MergeplugError) as exc:
        merge(recipe, tmp_path / "out", device="cuda")
    assert one_line(exc) == "--device cuda: no CUDA GPU is available to torch; use --device cpu or auto"
    assert not (tmp_path / "out").exists()
    assert (merge(recipe, tmp_path / "out", device="auto") / "model.safetensors").is_file()


def test_pytorch_bin_input_is_read_with_a_warning(zoo, write_recipe, tmp_path):
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(zoo["ft1"] / "config.json", legacy / "config.json")
    ft1 = load_file(str(zoo["ft1"] / "model.safetensors"))
    torch.save(ft1, legacy / "pytorch_model.bin")
    recipe = write_recipe({"method": "linear", "models": [{"model": str(zoo["base"])}, {"model": str(legacy)}]})
    with pytest.warns(UserWarning, match=r"models\[1\] .*reading pytorch_model\*\.bin"):
        out = merge(recipe, tmp_path / "out")
    base = load_file(str(zoo["base"] / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    for name in base:
        torch.testing.assert_close(merged[name], (base[name] + ft1[name]) / 2, rtol=1e-6, atol=1e-6)


# --- the command line ---------------------------------------------------------------------------------------
def test_cli_merge_exit_codes(zoo, write_recipe, tmp_path, use_registry):
    from mergeplug.cli import cli

    use_registry(Registry())
    runner = CliRunner()
    recipe = write_recipe(two_models(zoo))
    out = tmp_path / "out"
    result = runner.invoke(cli, ["merge", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {out}"
    assert (out / "model.safetensors").is_file()

    again = runner.invoke(cli, ["merge", str(recipe), "-o", str(out)])
    assert again.exit_code == 2
    assert again.output.strip().splitlines() == [
        f"error: {out}: already exists; pass --force to replace it (replaced only once the new merge is complete)"]

    forced = runner.invoke(cli, ["merge", str(recipe), "-o", str(out), "--force", "--dtype", "bf16"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    bad = write_recipe({"method": "linear", "models": []}, name="bad.yaml")
    result = runner.invoke(cli, ["merge", str(bad), "-o", str(tmp_path / "other")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: bad.yaml: models: [] should be non-empty"]
    assert not (tmp_path / "other").exists()
