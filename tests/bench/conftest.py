"""A small bench, run once per session in this process: a tiny Llama base made here, two domains (their shipped
offline samples), two training steps per specialist, and three merges (linear, ties at two densities)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mergeplug.testing import make_tiny_model, train_tiny_tokenizer

#: Two optimiser steps on 4 rows: enough to change the weights, not to learn anything (speed is the point here).
FINETUNE = {"max_steps": 2, "max_seq_length": 256, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
            "warmup_ratio": 0.0, "save_steps": 2}


def bench_recipe(base: Path, **over) -> dict:
    recipe = {
        "kind": "bench", "name": "smoke",
        "base_models": [{"name": "small", "model": str(base)}],
        "domains": ["math", "instruction_following"],
        "finetuner": {"name": "full", "parameters": dict(FINETUNE)},
        "training_limit": 4,
        "mergers": ["linear", {"name": "ties", "grid": {"density": [0.5, 1.0]}}],
        "evaluation": {"limit": 2, "max_new_tokens": 4, "batch_size": 4},
        "executor": {"name": "local", "parameters": {"workers": 0}},
        "offline": True, "device": "cpu",
    }
    recipe.update(over)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_base")
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    return make_tiny_model(root / "base", "llama", seed=0, tokenizer_folder=tokenizer, max_position_embeddings=256)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, tiny_base) -> SimpleNamespace:
    """The small bench, run once: its folder and the summary bench() returned."""
    from mergeplug.bench import bench

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    root = tmp_path_factory.mktemp("bench")
    recipe = write_recipe(root / "bench.yaml", bench_recipe(tiny_base))
    try:
        summary = bench(recipe, root / "out", progress=False)
    finally:
        mp.undo()
    return SimpleNamespace(root=root, out=root / "out", recipe=recipe, summary=summary)
