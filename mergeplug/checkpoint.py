"""Checkpoints on disk: lazy reading of Hugging Face model folders and streaming, sharded safetensors writing.

Reading: :class:`Checkpoint` parses ``config.json`` and the safetensors headers only (names, shapes, dtypes);
each tensor is read on request, with its own short-lived ``safetensors.safe_open`` handle. A handle kept open
for the whole run would keep every page it has touched mapped into the process (its resident memory would
grow to the size of the model); one handle per tensor keeps resident memory at the tensors in use.
``pytorch_model*.bin`` files are read with ``torch.load(weights_only=True, mmap=True)`` (no code runs) and a
warning. A folder that does not exist is fetched from the Hugging Face Hub when its name looks like a hub id.

LoRA adapters: :class:`LoraAdapter` reads a peft adapter folder (``adapter_config.json`` and
``adapter_model.safetensors``, no ``config.json``) over its base checkpoint as the full model it stands for:
each targeted weight reads as W_base + scaling·B·A (Hu et al., arXiv:2106.09685), computed in float32 one
tensor at a time, every other tensor as the base's, so mergers see an ordinary checkpoint whose task vector is
exactly the adapter's low-rank product. :func:`open_checkpoint` picks the right reader for a folder.

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
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns + ["pytorch_model*.bin", "adapter_model.bin"]))
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
        if is_lora_adapter(self.folder):
            raise MergeplugError(
                f"{self.where}: is a LoRA adapter (adapter_config.json, no config.json); open it with "
                f"open_checkpoint() or LoraAdapter(folder, base), which read it over its base model"
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

    def _torch_bins(self, files: list[Path], what: str = "pytorch_model*.bin") -> dict[str, TensorInfo]:
        import torch

        warnings.warn(f"{self.where}: reading {what} (pickle) with weights_only=True; "
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

    @property
    def config_folder(self) -> Path:
        """The folder ``config.json`` (and ``generation_config.json``, custom code) comes from."""
        return self.folder

    @property
    def tokenizer_folder(self) -> Path:
        """The folder to copy tokenizer files from."""
        return self.folder

    def get(self, name: str):
        """Tensor ``name`` on the CPU, in its stored dtype."""
        info = self.tensors.get(name)
        if info is None:
            raise MergeplugError(f"{self.where}: has no tensor {name}")
        return self._read(info)

    def _read(self, info: TensorInfo):
        """The tensor stored under ``info.name`` in ``info.file``."""
        if info.file in self._torch_state:
            return self._torch_state[info.file][info.name]
        from safetensors import safe_open

        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as handle:
                return handle.get_tensor(info.name)
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file
            raise MergeplugError(f"{self.where}: cannot read tensor {info.name} from {info.file.name}: {exc}") from None

    def read_order(self) -> list[str]:
        """Tensor names in file and offset order (sequential reads)."""
        files = sorted({i.file for i in self.tensors.values()})
        rank = {f: n for n, f in enumerate(files)}
        return sorted(self.tensors, key=lambda n: (rank[self.tensors[n].file], self.tensors[n].offset, n))


# --- LoRA adapters ------------------------------------------------------------------------------------------
#: The files of a peft adapter folder: its configuration and its weights (safetensors, or pickle from older peft).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

#: peft writes every adapter tensor under the wrapped model's name, ``base_model.model.<module path>...``.
_ADAPTER_PREFIX = "base_model.model."

#: The low-rank factors of one targeted module: Linear ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r),
#: ``lora_B.bias`` (out,) with lora_bias, Embedding ``lora_embedding_A`` (r, rows) and ``lora_embedding_B`` (dim, r).
_LORA_FACTOR = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)")

#: adapter_config.json fields that, when set, make the adapter more than W + scaling·B·A, and why.
_LORA_VARIANTS = {
    "use_dora": "DoRA (arXiv:2402.09353) rescales every merged row by a learned magnitude",
    "alora_invocation_tokens": "activated LoRA (arXiv:2504.12397) applies only after its invocation tokens, "
                               "so it has no merged weights",
    "monteclora_config": "MonteCLoRA samples its factors",
    "use_bdlora": "block-diagonal LoRA stores its factors in blocks",
    "use_qalora": "QA-LoRA (arXiv:2309.14717) pools the layer's inputs before A",
    "layer_replication": "layer replication adds blocks the base does not have",
    "trainable_token_indices": "trainable tokens store sparse embedding rows",
    "target_parameters": "LoRA on bare parameters (mixture-of-experts weights) is stored differently",
}

#: init_lora_weights values that subtract the initial product from the base weights (PiSSA arXiv:2404.02948,
#: OLoRA arXiv:2406.01775, CorDA arXiv:2406.05223, LoftQ arXiv:2310.08659, LoRA-GA arXiv:2407.05000): such an
#: adapter is relative to a modified base unless saved with ``path_initial_model_for_weight_conversion``, which
#: rewrites it against the original base and records init_lora_weights true.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def is_lora_adapter(folder: Path) -> bool:
    """Whether ``folder`` is a peft adapter folder (``adapter_config.json`` and no ``config.json``)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def open_checkpoint(folder: Path, *, label: str, ref: str | None = None, base: Checkpoint | None = None,
                    trust_remote_code: bool = False, _chain: tuple[Path, ...] = ()) -> Checkpoint:
    """The model in ``folder``: a :class:`Checkpoint`, or a :class:`LoraAdapter` over ``base``.

    An adapter's base is ``base`` when given (a recipe's base_model), else the model its adapter_config.json
    names in ``base_model_name_or_path`` (a folder, relative to the working directory as peft resolves it, or
    a hub id).
    """
    folder = Path(folder)
    if not is_lora_adapter(folder):
        return Checkpoint(folder, label=label, ref=ref)
    where = f"{label} ({ref or folder})"
    if base is None:
        config = _read_adapter_config(folder, where)
        base_ref = config.get("base_model_name_or_path")
        if not isinstance(base_ref, str) or not base_ref:
            raise MergeplugError(f"{where}: is a LoRA adapter whose {ADAPTER_CONFIG} names no base_model_name_or_path; "
                                 f"name its base model with base_model in the recipe")
        try:
            base_folder = resolve_model(base_ref, label=f"{label}'s base", trust_remote_code=trust_remote_code)
        except MergeplugError as exc:
            raise MergeplugError(f"{where}: is a LoRA adapter and its base does not open: {exc}; name its base "
                                 f"model with base_model in the recipe") from None
        if base_folder.resolve() in _chain or base_folder.resolve() == folder.resolve():
            raise MergeplugError(f"{where}: LoRA adapter base_model_name_or_path {base_ref!r} leads back to an adapter "
                                 f"already opened (a cycle); name its base model with base_model in the recipe")
        base = open_checkpoint(base_folder, label=f"{label}'s base", ref=base_ref, trust_remote_code=trust_remote_code,
                               _chain=(*_chain, folder.resolve()))
    return LoraAdapter(folder, base, label=label, ref=ref)


def _read_adapter_config(folder: Path, where: str) -> dict:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeplugError(f"{where}: cannot read {ADAPTER_CONFIG}: {exc}") from None
    if not isinstance(config, dict):
        raise MergeplugError(f"{where}: {ADAPTER_CONFIG} is not a JSON object")
    return config


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """peft's per-module override (``rank_pattern``/``alpha_pattern``): the first key that matches the end of
    the module path at a dot boundary, as ``peft.utils.other.get_pattern_key`` matches them."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass(frozen=True)
class LowRankUpdate:
    """What an adapter adds to one base tensor: ``scaling · B @ A`` (transposed when ``transpose``), or, for a
    lora_bias, ``scaling · b`` (``a`` is None)."""

    a: str | None  # adapter tensor names
    b: str
    scaling: float
    transpose: bool = False

    def delta(self, read):
        """The update in float32 (float64 when the factors are), from factors read with ``read(name)``."""
        import torch

        b = read(self.b)
        dtype = torch.promote_types(b.dtype, torch.float32)
        if self.a is None:
            return b.to(dtype).mul_(self.scaling)
        a = read(self.a).to(dtype)
        b = b.to(dtype)
        # (B A)^T computed as A^T B^T comes out contiguous; either way one product of the full tensor's size.
        product = a.T @ b.T if self.transpose else b @ a
        return product.mul_(self.scaling)


class LoraAdapter(Checkpoint):
    """A peft LoRA adapter folder read as the full model it stands for (Hu et al., arXiv:2106.09685).

    ``tensors`` are the base's, plus any the adapter stores whole (``modules_to_save``, biases with
    ``bias: all``/``lora_only``, resized embeddings), which replace the base's. :meth:`get` of a targeted
    weight returns W + scaling·B·A, with scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    (Kalajdzievski, arXiv:2312.03732), r and alpha per module from rank_pattern and alpha_pattern; the product
    is transposed for Embedding layers and for fan_in_fan_out (GPT-2's Conv1D stores weights as (in, out)).
    A targeted weight comes back in float32 (float64 over a float64 base) rather than in the base's dtype: a
    small update added in bfloat16 would lose most of its bits, and a task vector is meant to be the product.

    Every factor's shape is checked against the tensor it updates when the adapter is opened, before any
    weight is read; one product exists at a time, when its tensor is read.
    """

    def __init__(self, folder: Path, base: Checkpoint, *, label: str, ref: str | None = None):
        self.folder = Path(folder)
        self.label = label
        self.ref = ref or str(folder)
        self.where = f"{label} ({self.ref})"
        self.base = base
        self.adapter_config = _read_adapter_config(self.folder, self.where)
        self._check_config()
        self.config = base.config
        self._torch_state: dict[Path, dict] = {}
        self.stored: dict[str, TensorInfo] = self._adapter_index()
        self.replaced: dict[str, str] = {}  # tensor name -> the adapter tensor that replaces the base's
        self.updates: dict[str, LowRankUpdate] = {}
        self._plan()
        self.tensors: dict[str, TensorInfo] = dict(base.tensors)
        for name, key in self.replaced.items():
            info = self.stored[key]
            self.tensors[name] = TensorInfo(name, info.shape, info.dtype, info.file, info.offset)

    @property
    def config_folder(self) -> Path:
        return self.base.config_folder

    @property
    def tokenizer_folder(self) -> Path:
        """The adapter's own tokenizer when it saved one (it may add tokens), else its base's."""
        if any((self.folder / name).is_file() for name in TOKENIZER_FILES):
            return self.folder
        return self.base.tokenizer_folder

    def _check_config(self) -> None:
        config = self.adapter_config
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise MergeplugError(f"{self.where}: {ADAPTER_CONFIG} peft_type is {peft_type!r}; only LoRA adapters "
                                 f"(peft_type LORA) can be read as merge inputs")
        for key, why in _LORA_VARIANTS.items():
            if config.get(key) not in (None, False, [], {}, ""):
                raise MergeplugError(f"{self.where}: {ADAPTER_CONFIG} sets {key}: {why}, so the adapter is not "
                                     f"W + scaling·B·A; merge it into its base with peft's merge_and_unload and use that folder")
        init = str(config.get("init_lora_weights", True)).lower()
        if init.startswith(_RESIDUAL_INITS):
            raise MergeplugError(
                f"{self.where}: {ADAPTER_CONFIG} init_lora_weights is {config['init_lora_weights']!r}, which trains "
                f"against a modified copy of the base; save the adapter with peft's "
                f"path_initial_model_for_weight_conversion so it applies to the original base"
            )
        for key in ("r", "lora_alpha"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise MergeplugError(f"{self.where}: {ADAPTER_CONFIG} {key} is {value!r}; expected a positive number")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(key) or {}, dict):
                raise MergeplugError(f"{self.where}: {ADAPTER_CONFIG} {key} is {config[key]!r}; expected a mapping")

    def _adapter_index(self) -> dict[str, TensorInfo]:
        safetensors_file, bin_file = (self.folder / name for name in ADAPTER_WEIGHTS)
        if safetensors_file.is_file():
            return self._safetensors([safetensors_file])
        if bin_file.is_file():
            return self._torch_bins([bin_file], what=bin_file.name)
        raise MergeplugError(f"{self.where}: is a LoRA adapter ({ADAPTER_CONFIG}) without its weights: "
                             f"no {' or '.join(ADAPTER_WEIGHTS)} in {self.folder}")

    def _scaling(self, module: str, rank: int) -> float:
        config = self.adapter_config
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if r != rank:
            raise MergeplugError(f"{self.where}: LoRA factors of {module} have rank {rank}, but {ADAPTER_CONFIG} gives "
                                 f"r {r} for it; the adapter's config and weights do not belong together")
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    def _plan(self) -> None:
        """Sort the adapter's tensors into low-rank factors and whole replacements and check every shape."""
        factors: dict[str, dict[str, str]] = {}
        for key in self.stored:
            if not key.startswith(_ADAPTER_PREFIX):
                raise MergeplugError(f"{self.where}: adapter tensor {key} does not start with {_ADAPTER_PREFIX!r}, as "
                                     f"peft's save_pretrained writes them; this is not a peft LoRA adapter")
            rest = key[len(_ADAPTER_PREFIX):]
            match = _LORA_FACTOR.fullmatch(rest)
            if match:
                factors.setdefault(match["module"], {})[match["part"]] = key
            elif re.search(r"(^|\.)lora_", rest):
                raise MergeplugError(f"{self.where}: adapter tensor {key} is not a LoRA factor mergeplug knows "
                                     f"(lora_A/lora_B .weight, lora_B.bias, lora_embedding_A/B)")
            else:
                # A module peft wrapped stores its own parameters under base_layer (bias with bias: lora_only).
                name = re.sub(r"\.base_layer\.([^.]+)$", r".\1", rest)
                if name in self.replaced:
                    raise MergeplugError(f"{self.where}: adapter tensors {self.replaced[name]} and {key} both replace {name}")
                self.replaced[name] = key
        for module, parts in factors.items():
            self._plan_module(module, parts)

    def _shape_of(self, name: str) -> tuple[int, ...] | None:
        if name in self.replaced:
            return self.stored[self.replaced[name]].shape
        info = self.base.tensors.get(name)
        return None if info is None else info.shape

    def _plan_module(self, module: str, parts: dict[str, str]) -> None:
        embedding = any(p.startswith("lora_embedding") for p in parts)
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        missing = [p for p in (a_part, b_part) if p not in parts]
        strays = [p for p in parts if p not in (a_part, b_part, "lora_B.bias")]
        if missing or strays:
            problem = f"has no {missing[0]}" if missing else f"mixes {strays[0]} with {a_part}"
            raise MergeplugError(f"{self.where}: the LoRA factors of {module} are incomplete: it {problem}")
        a, b = self.stored[parts[a_part]], self.stored[parts[b_part]]
        for info in (a, b):
            if len(info.shape) != 2:
                raise MergeplugError(f"{self.where}: LoRA factor {info.name} has shape {list(info.shape)}; only Linear "
                                     f"and Embedding adapters (2-D factors) can be read as merge inputs")
            if info.dtype not in ("float64", "float32", "float16", "bfloat16"):
                raise MergeplugError(f"{self.where}: LoRA factor {info.name} has dtype {info.dtype}; expected a float")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise MergeplugError(f"{self.where}: LoRA factors of {module} disagree on the rank: {a.name} has shape "
                                 f"{list(a.shape)}, {b.name} has {list(b.shape)}")
        scaling = self._scaling(module, rank)
        transpose = embedding or bool(self.adapter_config.get("fan_in_fan_out"))
        product = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        target = f"{module}.weight"
        self._check_target(target, product, f"B @ A of {module}")
        self.updates[target] = LowRankUpdate(parts[a_part], parts[b_part], scaling, transpose)
        if "lora_B.bias" in parts:
            bias = self.stored[parts["lora_B.bias"]]
            self._check_target(f"{module}.bias", bias.shape, f"lora_B.bias of {module}")
            self.updates[f"{module}.bias"] = LowRankUpdate(None, parts["lora_B.bias"], scaling)

    def _check_target(self, target: str, shape: tuple[int, ...], what: str) -> None:
        have = self._shape_of(target)
        if have is None:
            raise MergeplugError(f"{self.where}: the adapter updates {target}, which its base {self.base.where} does "
                                 f"not have (a tied output layer, or another architecture); is this the adapter's base?")
        if tuple(have) != tuple(shape):
            raise MergeplugError(f"{self.where}: {what} has shape {list(shape)}, but {target} of its base "
                                 f"{self.base.where} has {list(have)}; is this the adapter's base?")

    def get(self, name: str):
        """Tensor ``name``: the base's or the adapter's own, plus the low-rank update when the adapter has one."""
        if name in self.replaced:
            value = self._read(self.stored[self.replaced[name]])
        elif name in self.base.tensors:
            value = self.base.get(name)
        else:
            raise MergeplugError(f"{self.where}: has no tensor {name}")
        update = self.updates.get(name)
        if update is None:
            return value
        import torch

        delta = update.delta(lambda key: self._read(self.stored[key]))
        dtype = torch.promote_types(delta.dtype, value.dtype)
        return delta.to(dtype).add_(value.to(dtype))


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


def replace_folder(finished: Path, out: Path) -> None:
    """Rename the complete folder ``finished`` to ``out``. An existing ``out`` is set aside first and removed
    only once the new one is in place (and put back if the rename fails), so ``out`` is never half-written."""
    import os
    import shutil
    import uuid

    if not out.exists():
        os.replace(finished, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(finished, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
