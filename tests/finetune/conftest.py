"""A tiny Llama base for the finetuning tests, built once per session (about a second), and offline data.

``tiny.base``: a hidden-32, two-layer model with the tiny BPE tokenizer and a 256-position context (the math
domain's training samples are 150 to 220 tokens in Alpaca format, so 256 keeps every response). Tests read the
math domain's shipped training sample (4 rows): the hub is never tried.
"""
from __future__ import annotations

import struct
import zlib
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


def _decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB scanlines of an 8-bit RGB PNG with filter-0 rows; every chunk's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        at += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 2)
    raw = zlib.decompress(chunks[1][1])
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = [raw[y * stride:(y + 1) * stride] for y in range(height)]
    assert {row[0] for row in rows} == {0}
    return width, height, [row[1:] for row in rows]


@pytest.fixture
def decode_png():
    """Width, height and RGB scanlines of an 8-bit RGB PNG with filter-0 rows; every chunk's CRC checked."""
    return _decode_png
