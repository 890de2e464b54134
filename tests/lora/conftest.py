"""Tiny models and peft LoRA adapters for the adapter-input and finetuner tests, built once per session.

``lora_zoo`` holds tiny float32 bases, full finetunes, and adapters saved by peft itself, each beside its
``merge_and_unload``-ed full weights (``zoo[name]`` the adapter folder, ``zoo[name + "_merged"]`` the merged
model): whatever the engine reads from an adapter must equal what peft merges.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from mergeplug.testing import make_tiny_model, train_tiny_tokenizer


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def save_lora(folder: Path, base: Path, config, seed: int, tokenizer: Path | None = None, resize: int | None = None) -> Path:
    """Wrap ``base`` with peft ``config``, move every trainable tensor by seeded noise (a trained adapter's
    B is not zero), save the adapter to ``folder`` and its merge_and_unload to ``folder`` + ``_merged``."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from mergeplug.checkpoint import copy_tokenizer_files

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if resize is not None:
        model.resize_token_embeddings(resize, mean_resizing=False)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(peft_model.named_parameters()):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on saved embeddings and 1-D lora_B biases
        peft_model.save_pretrained(str(folder))
    merged_folder = folder.with_name(folder.name + "_merged")
    peft_model.merge_and_unload().save_pretrained(str(merged_folder))
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, merged_folder)
    return folder


@pytest.fixture(scope="session")
def lora_zoo(tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("lora_zoo")

    def add(z, name, base, config, seed, tokenizer, resize=None):
        z[name] = save_lora(root / name, base, config, seed, tokenizer, resize)
        z[name + "_merged"] = root / (name + "_merged")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        tok = train_tiny_tokenizer(root / "tokenizer")
        z = {"tokenizer": tok}
        z["base"] = make_tiny_model(root / "base", "llama", seed=0, tokenizer_folder=tok)
        z["ft"] = make_tiny_model(root / "ft", base=z["base"], seed=1, tokenizer_folder=tok)
        z["narrow"] = make_tiny_model(root / "narrow", "llama", seed=4, intermediate=48, tokenizer_folder=tok)
        z["bias_base"] = make_tiny_model(root / "bias_base", "llama", seed=5, attention_bias=True, tokenizer_folder=tok)
        z["g_base"] = make_tiny_model(root / "g_base", "gemma2", seed=0, tokenizer_folder=tok)
        # all-linear, the finetuner's default targets
        add(z, "a1", z["base"], LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), 1, tok)
        add(z, "a2", z["base"], LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 2, tok)
        # rsLoRA with a per-module rank and alpha
        add(z, "rs", z["base"], LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3}), 3, tok)
        # adapter biases, trained base biases and a whole lm_head copy
        add(z, "bias", z["bias_base"], LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], bias="lora_only", lora_bias=True,
            modules_to_save=["lm_head"]), 4, tok)
        # an Embedding adapter (lora_embedding_A/B, saved with its base_layer weight)
        add(z, "emb", z["base"], LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"]), 5, tok)
        # resized vocabulary: peft saves the whole embedding and lm_head
        add(z, "vocab", z["base"], LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), 6, tok,
                               resize=264)
        # tied embeddings (Gemma 2)
        add(z, "g1", z["g_base"], LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"), 7, tok)
    return z


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe mapping to a YAML file in the test's folder; returns its path."""
    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture
def read_model():
    """``read_model(folder)``: every tensor of a model folder, by name."""
    from mergeplug.checkpoint import Checkpoint

    def read(folder: Path) -> dict:
        checkpoint = Checkpoint(Path(folder), label="out")
        return {name: checkpoint.get(name) for name in checkpoint.names}

    return read
