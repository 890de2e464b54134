"""A disk cache of per-model statistics for data-aware mergers (Fisher, RegMean's Gram matrices, learned masks).

An entry is a folder named by a hash of everything that determines the statistic: which statistic and its
settings, the model (:func:`model_fingerprint`: its config and the names, sizes and modification times of its
weight files, or a hub id with its revision), and the data (:func:`data_fingerprint` of the rows used). A changed
model, data set or setting therefore gives a new key, and the old entry is simply not found.

Entries are written to a temporary folder and renamed, so a half-written entry never exists. Each entry records
the size and SHA-256 of its tensor file; an entry whose file does not match its record (truncated, edited, a
different file) is removed and reported as missing, so it is recomputed, never trusted. Tensors are read one at
a time (:meth:`StoredStatistic.get`), so the merge engine can read a model's statistic beside its weight.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

#: Environment variable naming the cache folder (default: $XDG_CACHE_HOME/mergeplug/statistics).
CACHE_ENV = "MERGEPLUG_CACHE"
RECORD_FILE = "record.json"
TENSOR_FILE = "statistic.safetensors"
#: Bump when the layout of an entry changes: older entries then stop matching any key.
FORMAT_VERSION = 1


def default_cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mergeplug" / "statistics"


def content_digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys; what JSON cannot hold, by its str): a content key."""
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def model_fingerprint(model: str, revision: str | None = None) -> dict:
    """What identifies a model's weights: for a local folder its config.json content and each weight file's
    name, size and modification time (a retrained model in the same folder changes it); for a hub id, the id
    and revision."""
    folder = Path(model)
    if not folder.is_dir():
        return {"hub_id": model, "revision": revision or "main"}
    config = folder / "config.json"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    return {
        "folder": str(folder.resolve()),
        "config": config.read_text(encoding="utf-8") if config.is_file() else None,
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def data_fingerprint(rows: list[dict]) -> str:
    """A hash of the rows a statistic is computed on (their order matters: statistics may use the first N)."""
    return content_digest(rows)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read 16 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class StoredStatistic:
    """One cache entry: its metadata, its tensor names, and each tensor read on demand."""

    def __init__(self, folder: Path, record: dict):
        self.folder = folder
        self.record = record
        self.meta: dict = record.get("meta", {})

    @property
    def names(self) -> list[str]:
        return list(self.record["names"])

    def get(self, name: str):
        from safetensors import safe_open

        from .errors import MergeplugError

        if name not in self.record["names"]:
            raise MergeplugError(f"statistics cache entry {self.folder.name}: has no tensor {name}")
        with safe_open(str(self.folder / TENSOR_FILE), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)


class StatisticsCache:
    """Statistics on disk under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_root()

    def key(self, *, statistic: str, model: dict, data: str, settings: Mapping[str, Any]) -> str:
        """The entry name for ``statistic`` of ``model`` (a :func:`model_fingerprint`) on ``data`` (a
        :func:`data_fingerprint`) with ``settings`` (everything else the computation reads)."""
        return content_digest({"format": FORMAT_VERSION, "statistic": statistic, "model": model, "data": data,
                        "settings": dict(settings)})[:32]

    def get(self, key: str) -> StoredStatistic | None:
        """The entry ``key`` if present and intact; a damaged entry is removed and None returned."""
        folder = self.root / key
        record_path = folder / RECORD_FILE
        if not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            tensors = folder / TENSOR_FILE
            intact = (record.get("key") == key and record.get("format") == FORMAT_VERSION and tensors.is_file()
                      and tensors.stat().st_size == record["size"] and file_sha256(tensors) == record["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return StoredStatistic(folder, record)

    def put(self, key: str, tensors: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> StoredStatistic:
        """Write ``tensors`` (name to tensor) as entry ``key``, atomically; an existing entry is replaced."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            path = staging / TENSOR_FILE
            save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(path))
            record = {"key": key, "format": FORMAT_VERSION, "names": sorted(tensors), "size": path.stat().st_size,
                      "sha256": file_sha256(path), "meta": dict(meta or {})}
            (staging / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
            final = self.root / key
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return StoredStatistic(final, record)

    def get_or_compute(self, key: str, compute: Callable[[], Mapping[str, Any]],
                       meta: Mapping[str, Any] | None = None) -> tuple[StoredStatistic, bool]:
        """The entry ``key``, computing and storing it first when missing or damaged; also whether it was
        computed now (False: reused)."""
        found = self.get(key)
        if found is not None:
            return found, False
        return self.put(key, compute(), meta), True
