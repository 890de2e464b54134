"""A tiny world for tuning: a base, a math specialist trained on the validation rows, local data, offline."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from mergeplug.testing import make_tiny_model, train_tiny_tokenizer

#: Validation rows of the math domain, in its data set's own columns (query, response).
VALIDATION = [{"query": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}. The answer is: {a + b}"}
              for a, b in ((2, 3), (4, 1), (6, 2), (1, 7))]


def train_specialist(base: Path, folder: Path, tokenizer_folder: Path, rows: list[dict]) -> Path:
    """The base trained briefly on ``rows`` (Alpaca-rendered as the math domain renders them): a real specialist
    whose validation likelihood beats the base's by far."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeplug.checkpoint import copy_tokenizer_files
    from mergeplug.data import render_training_example
    from mergeplug.plugins import Registry

    domain = Registry().get("domain", "math").load()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    texts = ["".join(render_training_example(domain, {"instruction": r["query"], "response": r["response"]}))
             for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.save_pretrained(str(folder))
    copy_tokenizer_files(tokenizer_folder, folder)
    return folder


@contextmanager
def one_thread():
    """Tiny models run fastest on one thread; on a shared CPU two threads wait on each other (20x slower here)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    with one_thread():
        return _build_world(tmp_path_factory)


def _build_world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tune_world")
    tok = train_tiny_tokenizer(root / "tok")
    base = make_tiny_model(root / "base", "llama", seed=0, num_layers=1, hidden=16, tokenizer_folder=tok,
                           max_position_embeddings=256)
    val = root / "math_val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in VALIDATION), encoding="utf-8")
    other = make_tiny_model(root / "other", base=base, seed=5, tokenizer_folder=tok)
    return {"root": root, "tok": tok, "base": base, "val": val, "other": other,
            "math": train_specialist(base, root / "math_specialist", tok, VALIDATION)}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tune_recipe(tmp_path, world):
    """Write a tune recipe (the one-specialist problem unless overridden) to a YAML file; returns its path."""
    def write(merge: dict | str | None = None, search: dict | None = None, name: str = "tune.yaml", **rest) -> Path:
        data = {
            "kind": "tune",
            "merge": merge if merge is not None else {
                "method": "task_arithmetic", "base_model": str(world["base"]),
                "models": [{"model": str(world["math"]), "domain": "math"}],
            },
            "search": search if search is not None else {"space": {"lambda": [0.0, 0.5, 1.0]}},
            "data": {"math": {"data_files": str(world["val"])}},
            "device": "cpu",
            **rest,
        }
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write
