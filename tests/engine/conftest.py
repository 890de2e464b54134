"""Session-scoped tiny checkpoints (built once, a few seconds in all) and helpers to write recipes."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergeplug.testing import make_tiny_model, train_tiny_tokenizer


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Tiny models by role: a Llama base, two finetunes, sharded copies, a Gemma 2 (tied) trio and misfits."""
    root = tmp_path_factory.mktemp("zoo")
    tok = train_tiny_tokenizer(root / "tokenizer")
    m = {"tokenizer": tok}
    m["base"] = make_tiny_model(root / "base", "llama", seed=0, tokenizer_folder=tok)
    m["ft1"] = make_tiny_model(root / "ft1", base=m["base"], seed=1, tokenizer_folder=tok)
    m["ft2"] = make_tiny_model(root / "ft2", base=m["base"], seed=2, tokenizer_folder=tok)
    m["ft1_sharded"] = make_tiny_model(root / "ft1_sharded", base=m["base"], seed=1, tokenizer_folder=tok,
                                       max_shard_size="20KB")
    m["ft_vocab"] = make_tiny_model(root / "ft_vocab", base=m["base"], seed=3, vocab_size=264, tokenizer_folder=tok)
    m["narrow"] = make_tiny_model(root / "narrow", "llama", seed=4, intermediate=48)
    m["mistral"] = make_tiny_model(root / "mistral", "mistral", seed=5)
    m["g_base"] = make_tiny_model(root / "g_base", "gemma2", seed=0, tokenizer_folder=tok)
    m["g_ft1"] = make_tiny_model(root / "g_ft1", base=m["g_base"], seed=1, tokenizer_folder=tok)
    m["g_ft2"] = make_tiny_model(root / "g_ft2", base=m["g_base"], seed=2, tokenizer_folder=tok)
    return m


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe mapping to a YAML file in the test's folder; returns its path."""
    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write
