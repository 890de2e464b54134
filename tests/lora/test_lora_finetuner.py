"""The `lora` finetuner: peft adapters on the linear layers; saves a reloadable merged checkpoint and the
adapter, and the adapter as a merge input equals its merged weights."""
from __future__ import annotations

import json

import pytest
import torch

from mergeplug import MergeplugError
from mergeplug.checkpoint import Checkpoint, LoraAdapter, open_checkpoint
from mergeplug.engine import merge
from mergeplug.finetuning import Finetuner, parameter_schema, training_defaults
from mergeplug.plugins import Registry
from mergeplug.schema import defaults, load_schema, problems
from mergeplug.testing import TINY_CORPUS

LORA_KEYS = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear", "use_rslora": False}


@pytest.fixture(scope="module")
def lora_component():
    return Registry().get("finetuner", "lora")


@pytest.fixture
def make_finetuner(lora_component):
    def make(**parameters):
        # as the core builds it: the training parameters' defaults, then the plugin's own (lr), then the given
        return lora_component.load()(**{**defaults(parameter_schema(lora_component)), **parameters})

    return make


def tiny_batch(tokenizer_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    batch = tokenizer(TINY_CORPUS[:4], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return tokenizer, batch


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def assert_same_model(left: Checkpoint, right: Checkpoint) -> None:
    assert set(left.names) == set(right.names)
    for name in right.names:
        torch.testing.assert_close(left.get(name), right.get(name), rtol=0, atol=1e-6, msg=name)


def test_registered_through_the_plugin_manager(lora_component):
    from mergeplug_plugins.finetuners.lora.finetuner import LoraFinetuner

    cls = lora_component.load()
    assert cls is LoraFinetuner and issubclass(cls, Finetuner)
    assert lora_component.reference == "arXiv:2106.09685"
    own = lora_component.parameters
    assert problems(own, load_schema("component-parameters"), source="lora") == []
    assert set(own["properties"]) == set(LORA_KEYS) | {"learning_rate"}
    values = defaults(parameter_schema(lora_component))
    assert {k: values[k] for k in LORA_KEYS} == LORA_KEYS and values["learning_rate"] == 2e-4
    assert set(values) == set(Finetuner.TRAINING_PARAMETERS) | set(LORA_KEYS)
    # every other training default is the core's (MergeBench's recipe)
    assert {k: v for k, v in values.items() if k not in LORA_KEYS and k != "learning_rate"} == \
        {k: v for k, v in training_defaults().items() if k != "learning_rate"}


def test_lora_config_carries_the_parameters(make_finetuner):
    config = make_finetuner(r=8, alpha=4, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True).lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.bias) == (8, 4, 0.1, True, "none")
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.task_type == "CAUSAL_LM"
    assert make_finetuner().lora_config().target_modules == "all-linear"


def test_trained_adapter_saves_a_reloadable_merged_checkpoint_and_the_adapter(lora_zoo, make_finetuner, tmp_path,
                                                                              write_recipe):
    base = lora_zoo["base"]
    tokenizer, batch = tiny_batch(base)
    finetuner = make_finetuner(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    model = finetuner.prepare_model(load(base))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trainable)  # 2 layers x 7 linears
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert all(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if ".lora_B." in n)  # B left zero-init
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits

    out = tmp_path / "out"
    out.mkdir()
    finetuner.save(model, tokenizer, out, base=str(base))

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, False)
    for folder in (out, out / "adapter"):
        assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    with torch.no_grad():
        reloaded = load(out)(**batch).logits
    torch.testing.assert_close(reloaded, logits, rtol=1e-5, atol=1e-5)

    adapter = open_checkpoint(out / "adapter", label="models[0]")  # base from its adapter_config.json
    assert isinstance(adapter, LoraAdapter) and len(adapter.updates) == 14
    assert_same_model(adapter, Checkpoint(out, label="merged"))

    results = {}
    for name, model_folder in (("adapter", out / "adapter"), ("merged", out)):
        recipe = write_recipe({"method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(model_folder)}],
                               "parameters": {"lambda": 0.5}}, name=f"{name}.yaml")
        results[name] = Checkpoint(merge(recipe, tmp_path / f"merge_{name}"), label=name)
    assert_same_model(results["adapter"], results["merged"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(results["adapter"].get(q), Checkpoint(base, label="base").get(q))


def test_gradient_checkpointing_still_trains_every_adapter(lora_zoo, make_finetuner):
    _, batch = tiny_batch(lora_zoo["base"])
    model = make_finetuner(r=2, alpha=4, dropout=0.0, gradient_checkpointing=True).prepare_model(load(lora_zoo["base"]))
    # Reentrant checkpointing, which needs inputs that require a gradient: prepare_model must provide them.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    # B starts at zero, so A's first gradient is zero; B's is not
    assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if ".lora_B." in n)


def test_save_needs_the_peft_model(lora_zoo, make_finetuner, tmp_path):
    tokenizer, _ = tiny_batch(lora_zoo["base"])
    with pytest.raises(MergeplugError, match=r"^finetuner 'lora': save\(\) got a LlamaForCausalLM, not the peft model"):
        make_finetuner().save(load(lora_zoo["base"]), tokenizer, tmp_path, base=str(lora_zoo["base"]))


def test_finetune_run_with_lora_end_to_end(lora_zoo, tmp_path):
    from mergeplug.finetuning import finetune

    out = finetune(str(lora_zoo["base"]), "math", tmp_path / "specialist", finetuner="lora", limit=4, device="cpu",
                   progress=False, offline=True, parameters={
                       "max_steps": 2, "r": 4, "alpha": 8, "dropout": 0.0, "max_seq_length": 128,
                       "per_device_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2})
    summary = json.loads((out / "mergeplug_finetune.json").read_text())
    assert summary["steps"] == 2 and summary["finetuner"] == "lora"
    adapter = open_checkpoint(out / "adapter", label="models[0]")
    merged = Checkpoint(out, label="merged")
    assert_same_model(adapter, merged)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(merged.get(q), Checkpoint(lora_zoo["base"], label="base").get(q))
