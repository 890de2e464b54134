"""Shared fixtures: an in-process registry built through the real plugin manager, and a PNG decoder for the
plots' tests."""
from __future__ import annotations

import os
import struct
import zlib

import pytest

from mergeplug import plugins


def pytest_configure(config):
    # Tiny test models gain nothing from several threads, and where the CPU is shared OpenMP's spinning threads
    # made steps of them 10-100x slower. Set before torch is first imported (no conftest imports it).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class FakeDist:
    def __init__(self, name: str, version: str):
        self.name, self.version = name, version


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: a name, a distribution and a load()."""

    def __init__(self, name, load, dist="acme-plugins", version="1.2.3", value=None):
        self.name, self._load = name, load
        self.value = value or f"{name}_module"
        self.dist = FakeDist(dist, version)

    def load(self):
        if isinstance(self._load, BaseException):
            raise self._load
        return self._load


@pytest.fixture
def use_registry():
    """Install a registry as the process-wide one for the duration of a test."""
    previous = plugins.set_registry(None)

    def install(registry):
        plugins.set_registry(registry)
        return registry

    yield install
    plugins.set_registry(previous)


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


@pytest.fixture
def statistics_cache(monkeypatch, tmp_path):
    """Offline (no hub), with the statistics cache of data-aware mergers in a fresh folder; returns it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MERGEPLUG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
