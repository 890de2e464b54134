"""The statistics cache: keys follow model, data and settings; entries are reused, and never trusted when damaged."""
from __future__ import annotations

import json
import os

import torch

from mergeplug.statistics import (
    RECORD_FILE, TENSOR_FILE, StatisticsCache, data_fingerprint, default_cache_root, model_fingerprint,
)


def fake_model(folder, weights=b"\x00" * 64):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def key_of(cache, model, rows, **settings):
    return cache.key(statistic="fisher", model=model_fingerprint(str(model)), data=data_fingerprint(rows),
                     settings={"samples": 4, **settings})


def test_a_stored_statistic_is_reused_without_computing(tmp_path):
    cache = StatisticsCache(tmp_path / "cache")
    model = fake_model(tmp_path / "m")
    rows = [{"q": "a"}, {"q": "b"}]
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.float64)}

    key = key_of(cache, model, rows)
    first, computed = cache.get_or_compute(key, compute, {"samples": 4})
    again, recomputed = cache.get_or_compute(key, compute)
    assert (computed, recomputed, len(calls)) == (True, False, 1)
    assert again.names == ["b", "w"] and again.meta == {"samples": 4}
    torch.testing.assert_close(again.get("w"), torch.arange(6.0).view(2, 3))
    assert again.get("b").dtype == torch.float64
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")], "no staging folder is left"


def test_the_key_changes_with_the_model_the_data_and_the_settings(tmp_path):
    cache = StatisticsCache(tmp_path / "cache")
    model = fake_model(tmp_path / "m")
    rows = [{"q": "a"}]
    key = key_of(cache, model, rows)
    assert key == key_of(cache, model, [{"q": "a"}])
    assert key != key_of(cache, model, [{"q": "b"}])
    assert key != key_of(cache, model, rows, samples=8)
    assert key != key_of(cache, fake_model(tmp_path / "other"), rows)
    (model / "model.safetensors").write_bytes(b"\x01" * 65)  # retrained in place: another size and time
    assert key != key_of(cache, model, rows)
    assert model_fingerprint("org/name") == {"hub_id": "org/name", "revision": "main"}


def test_a_damaged_entry_is_recomputed_never_trusted(tmp_path):
    cache = StatisticsCache(tmp_path / "cache")
    key = key_of(cache, fake_model(tmp_path / "m"), [])
    stored = cache.put(key, {"w": torch.zeros(4)})
    path = stored.folder / TENSOR_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    assert cache.get(key) is None and not stored.folder.exists()
    fresh, computed = cache.get_or_compute(key, lambda: {"w": torch.ones(4)})
    assert computed and torch.equal(fresh.get("w"), torch.ones(4))
    (fresh.folder / TENSOR_FILE).write_bytes(b"short")  # truncated
    assert cache.get(key) is None
    cache.put(key, {"w": torch.ones(4)})
    (cache.root / key / RECORD_FILE).write_text("{not json")
    assert cache.get(key) is None


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEPLUG_CACHE", str(tmp_path / "here"))
    assert default_cache_root() == tmp_path / "here"
    monkeypatch.delenv("MERGEPLUG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "mergeplug" / "statistics"
    assert os.fspath(StatisticsCache().root).endswith("mergeplug/statistics")
