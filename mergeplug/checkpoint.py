"""Checkpoints on disk: lazy reading of Hugging Face model folders and streaming, sharded safetensors writing.

Reading: :class:`Checkpoint` parses ``config.json`` and the safetensors headers only (names, shapes, dtypes);
each tensor is read on request, with its own short-lived ``safetensors.safe_open`` handle. A handle kept open
for the whole run would keep every page it has touched mapped into the process (its resident memory would
grow to the size of the model); one handle per tensor keeps resident memory at the tensors in use.
``pytorch_model*.bin`` files are read with ``torch.load(weights_only=True, mmap=True)`` (no code runs) and a
warning. A folder that does not exist is fetched from the Hugging Face Hub when its name looks like a hub id.

Writing: :class:`ShardedWriter` plans the shards from the output names, shapes and dtypes before any tensor is
merged, writes each shard's header first and then streams each tensor's bytes into it as it arrives, so no
shard is ever held in memory. With more than one shard it writes ``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import MergeplugError

#: Tokenizer and chat-template files copied from the tokenizer source into a merged model.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "tokenizer.tiktoken",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)

#: What ``snapshot_download`` fetches for a hub model: weights, configs and tokenizer files, no code.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
_ITEMSIZE = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(value: Any) -> str:
    """``"bf16"``, ``"bfloat16"``, ``torch.bfloat16`` -> ``"bfloat16"``."""
    name = str(value).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def torch_dtype(value: Any):
    import torch

    name = dtype_name(value)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise MergeplugError(f"unknown dtype {value!r}; use float32, float16 or bfloat16")
    return dtype


def parse_size(value: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"2GiB"`` -> 2·2^30, an int is bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*", str(value))
    if not match:
        raise MergeplugError(f"shard_size: {value!r} is not a size like 5GB or 500MiB")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[match.group(2)]
    return int(float(match.group(1)) * unit)


# --- reading -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """A tensor's header entry: where it is and what it is, without its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name: "bfloat16"
    file: Path
    offset: int = 0  # byte offset in its file's data section (safetensors), for reading in file order

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE.get(self.dtype, 4)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets), no data read."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as exc:
        raise MergeplugError(f"{path}: not a readable safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return header


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` has the shape of a Hugging Face hub id (``owner/name``)."""
    return bool(_HUB_ID.match(ref))


def resolve_model(ref: str, *, label: str, trust_remote_code: bool = False, relative_to: Path | None = None) -> Path:
    """The local folder of model reference ``ref``: a folder (absolute, relative to the working directory or
    to ``relative_to``), else a hub id fetched with ``huggingface_hub.snapshot_download``."""
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path] + ([relative_to / path] if relative_to else [])
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
        if candidate.exists():
            raise MergeplugError(f"{label} ({ref}): is a file; give the model's folder")
    if not _HUB_ID.match(ref):
        raise MergeplugError(f"{label} ({ref}): no such model folder")
    return _download(ref, label=label, trust_remote_code=trust_remote_code)


def _download(repo_id: str, *, label: str, trust_remote_code: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns + ["pytorch_model*.bin"]))
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all are the user's to fix
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MergeplugError(
            f"{label} ({repo_id}): no such local folder, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {reason}); check the path, or go online / log in with `hf auth login`"
        ) from None
    return folder


class Checkpoint:
    """A model folder opened lazily: config, tensor names, shapes and dtypes now; tensor data on :meth:`get`."""

    def __init__(self, folder: Path, *, label: str, ref: str | None = None):
        self.folder = Path(folder)
        self.label = label
        self.ref = ref or str(folder)
        self.where = f"{label} ({self.ref})"
        if (self.folder / "adapter_config.json").is_file() and not (self.folder / "config.json").is_file():
            raise MergeplugError(
                f"{self.where}: is a LoRA adapter (adapter_config.json); LoRA adapter inputs arrive with the "
                f"finetune issue: merge the adapter into its base first (peft's merge_and_unload) and use that folder"
            )
        self.config = self._read_json("config.json", required=True)
        self._torch_state: dict[Path, dict] = {}
        self.tensors: dict[str, TensorInfo] = self._index()

    def _read_json(self, name: str, required: bool = False) -> dict | None:
        path = self.folder / name
        if not path.is_file():
            if required:
                raise MergeplugError(f"{self.where}: no {name} in {self.folder}; is this a Hugging Face model folder?")
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MergeplugError(f"{self.where}: cannot read {name}: {exc}") from None

    def _index(self) -> dict[str, TensorInfo]:
        index = self._read_json("model.safetensors.index.json")
        if index is not None:
            files = sorted(set(index.get("weight_map", {}).values()))
            return self._safetensors([self.folder / f for f in files], expected=set(index["weight_map"]))
        if (self.folder / "model.safetensors").is_file():
            return self._safetensors([self.folder / "model.safetensors"])
        shards = sorted(self.folder.glob("model-*-of-*.safetensors"))
        if shards:
            return self._safetensors(shards)
        bins = sorted(self.folder.glob("pytorch_model*.bin"))
        if bins:
            return self._torch_bins(bins)
        raise MergeplugError(f"{self.where}: no model.safetensors, sharded safetensors or pytorch_model.bin in {self.folder}")

    def _safetensors(self, files: list[Path], expected: set[str] | None = None) -> dict[str, TensorInfo]:
        entries = []
        for path in files:
            if not path.is_file():
                raise MergeplugError(f"{self.where}: {path.name} is listed in model.safetensors.index.json but missing")
            for name, meta in read_safetensors_header(path).items():
                dtype = _SAFETENSORS_DTYPES.get(meta.get("dtype"))
                if dtype is None:
                    raise MergeplugError(f"{self.where}: tensor {name} in {path.name} has unsupported dtype {meta.get('dtype')!r}")
                entries.append(TensorInfo(name, tuple(meta["shape"]), dtype, path, meta["data_offsets"][0]))
        found = {e.name: e for e in entries}
        if expected is not None and expected - set(found):
            missing = sorted(expected - set(found))[0]
            raise MergeplugError(f"{self.where}: tensor {missing} is in model.safetensors.index.json but in no shard")
        return found

    def _torch_bins(self, files: list[Path]) -> dict[str, TensorInfo]:
        import torch

        warnings.warn(f"{self.where}: reading pytorch_model*.bin (pickle) with weights_only=True; "
                      f"prefer safetensors checkpoints", stacklevel=3)
        found = {}
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - weights_only refuses anything but tensors
                raise MergeplugError(f"{self.where}: cannot read {path.name} safely: {type(exc).__name__}: {exc}") from None
            self._torch_state[path] = state
            for name, tensor in state.items():
                found[name] = TensorInfo(name, tuple(tensor.shape), dtype_name(tensor.dtype), path)
        return found

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str):
        """Tensor ``name`` on the CPU, in its stored dtype."""
        info = self.tensors.get(name)
        if info is None:
            raise MergeplugError(f"{self.where}: has no tensor {name}")
        if info.file in self._torch_state:
            return self._torch_state[info.file][name]
        from safetensors import safe_open

        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file
            raise MergeplugError(f"{self.where}: cannot read tensor {name} from {info.file.name}: {exc}") from None

    def read_order(self) -> list[str]:
        """Tensor names in file and offset order (sequential reads)."""
        files = sorted({i.file for i in self.tensors.values()})
        rank = {f: n for n, f in enumerate(files)}
        return sorted(self.tensors, key=lambda n: (rank[self.tensors[n].file], self.tensors[n].offset, n))


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer files that exist in ``source`` (see :data:`TOKENIZER_FILES`); returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(destination) / name)
            copied.append(name)
    return copied


# --- writing -----------------------------------------------------------------------------------------------
@dataclass
class _Shard:
    file: str
    names: list[str]
    header: bytes
    size: int


class ShardedWriter:
    """Writes tensors, streamed one at a time in :attr:`order`, into safetensors shards of at most
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own).

    ``entries`` are ``(name, shape, dtype)`` of every output tensor. Within a shard, tensors are laid out by
    decreasing element size so every tensor's offset is aligned to its dtype (as safetensors itself does).
    """

    def __init__(self, folder: Path, entries: Iterable[tuple[str, tuple[int, ...], str]], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.entries = {name: (tuple(shape), dtype_name(dtype)) for name, shape, dtype in entries}
        groups: list[list[str]] = []
        size = 0
        for name, (shape, dtype) in self.entries.items():
            nbytes = math.prod(shape) * _ITEMSIZE[dtype]
            if not groups or (size + nbytes > max_shard_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        n = len(groups)
        self.shards = []
        for i, names in enumerate(groups):
            names.sort(key=lambda k: -_ITEMSIZE[self.entries[k][1]])
            file = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self.shards.append(self._plan(file, names))
        self.order = [name for shard in self.shards for name in shard.names]
        self.total_bytes = sum(s.size for s in self.shards)
        self._next = 0
        self._shard_index = -1
        self._handle = None

    def _plan(self, file: str, names: list[str]) -> _Shard:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for name in names:
            shape, dtype = self.entries[name]
            nbytes = math.prod(shape) * _ITEMSIZE[dtype]
            header[name] = {"dtype": _TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        return _Shard(file, names, struct.pack("<Q", len(raw)) + raw, offset)

    def write(self, name: str, tensor) -> None:
        """Append tensor ``name``, which must be the next in :attr:`order`, with its planned shape and dtype."""
        import torch

        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"ShardedWriter: got {name}, expected {expected}")
        shape, dtype = self.entries[name]
        if tuple(tensor.shape) != shape or dtype_name(tensor.dtype) != dtype:
            raise MergeplugError(f"tensor {name}: merged result has shape {list(tensor.shape)} {dtype_name(tensor.dtype)}, "
                                 f"expected {list(shape)} {dtype}")
        shard = self._shard_of(self._next)
        if shard != self._shard_index:
            self._close_handle()
            self._shard_index = shard
            self._handle = open(self.folder / self.shards[shard].file, "wb")
            self._handle.write(self.shards[shard].header)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._handle.write(data.view(torch.uint8).numpy().data)
        self._next += 1

    def _shard_of(self, position: int) -> int:
        for i, shard in enumerate(self.shards):
            if position < len(shard.names):
                return i
            position -= len(shard.names)
        raise IndexError(position)

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index when sharded; returns the files written."""
        self._close_handle()
        if self._next != len(self.order):
            raise RuntimeError(f"ShardedWriter: {len(self.order) - self._next} tensors were never written")
        files = [s.file for s in self.shards]
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: s.file for s in self.shards for name in s.names},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            files.append("model.safetensors.index.json")
        return files

    def abort(self) -> None:
        self._close_handle()
