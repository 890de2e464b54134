"""A tiny Llama base for the finetuning tests, built once per session (about a second), and offline data.

``tiny.base``: a hidden-32, two-layer model with the tiny BPE tokenizer and a 256-position context (the math
domain's training samples are 150 to 220 tokens in Alpaca format, so 256 keeps every response). Tests read the
math domain's shipped training sample (4 rows): the hub is never tried.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from mergeplug.testing import make_tiny_model, train_tiny_tokenizer

#: Parameters of a short run that visibly learns: no warmup, one sequence per step, a large learning rate.
QUICK = {"max_seq_length": 256, "gradient_accumulation_steps": 1, "learning_rate": 3e-3, "warmup_ratio": 0.0,
         "save_steps": 2}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    base = make_tiny_model(root / "base", "llama", seed=0, tokenizer_folder=tokenizer, max_position_embeddings=256)
    return SimpleNamespace(root=Path(root), base=base, tokenizer=tokenizer)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def quick() -> dict:
    return dict(QUICK)
