"""Knowledge fusion of models with different tokenizers (FuseChat, arXiv:2402.16107): the distribution store,
the fused targets, the fusion loss and the ``mergeplug fuse`` pipeline.

``mergeplug fuse RECIPE -o OUT`` runs FuseChat's four steps, each one's output content-addressed under a work
folder beside OUT (``OUT.fuse-work/``) and skipped when it is already there:

1. **record** (:func:`record_distributions`): every source and the pivot run over the fusion corpus; per real
   (unpadded) position the store keeps the top-k next-token ids and log-probabilities, the tokenisation (ids,
   character offsets) and, per sequence, the summed log-loss of the gold tokens (for MinCE);
2. **align** (:func:`build_targets`): each source's distributions are moved onto the pivot's positions
   (sequence alignment by character offsets, :mod:`mergeplug.alignment`) and vocabulary (an ``aligner``
   plugin, ``mined`` by default), then per sequence the fused target is chosen among the pivot's own
   distributions and the aligned source's (:func:`fuse_sequence`);
3. **finetune**: the pivot is trained against each source's fused targets (finetuner ``fusion``:
   L = λ·L_LM + (1−λ)·L_fusion, :func:`fusion_loss`), one target model per source;
4. **merge**: the targets, now of the pivot's architecture, are merged in parameter space (merger ``varm`` by
   default, or ``sce``; base = the pivot) into OUT with a model card, written atomically.

Several processes (``torchrun``, ``accelerate launch``)
--------------------------------------------------------
Under a launcher (``WORLD_SIZE`` > 1) every process reads the recipe and corpus (a bad recipe fails on each
alike), then the work is split as :class:`Processes` says:

- steps 1 and 2, the output check and step 4 (merge, model card, rename into OUT) run on the main process
  (``RANK`` 0, as ``mergeplug finetune`` decides it) only, and only it reports progress;
- the others wait for each step folder the main process writes, polling its manifest until it says complete
  (:data:`POLL_SECONDS`), then for its word that it is through (``main-steps.json`` in the work folder): no
  collective call, so a recording of hours never meets gloo's or NCCL's timeout, and they never read a store
  the main process has not finished;
- should the main process fail there, it writes its error to ``error.json`` in the work folder instead
  (atomically; each marker names its launch, so one left by an earlier launch is ignored, and the main process
  removes those at start); the others raise it as theirs, and no process exits before every other has printed
  it (a launcher stops them all once one exits with an error; :data:`ERROR_REPORT_SECONDS`);
- step 3 runs on every process: each target model is trained data parallel by the same run as ``mergeplug
  finetune`` (transformers' Trainer over accelerate), one source after the other in one process group, which
  every process ends once after the last; the others then return while the main process merges.

The work folder must be on a file system every process sees (as ``mergeplug finetune``'s staging folder).

The store
---------
A folder with ``manifest.json`` and shards ``shard-00000.safetensors``... Sequences are processed longest text
first (so the padding of a batch is small and an out-of-memory error comes early) and cut into shards of
``shard_sequences`` sequences; the order depends on the texts only, so shard i of every model's store holds the
same texts and two stores are aligned shard by shard, two shards in memory. Per shard, ``T`` its real tokens and
``S`` its sequences:

=================  ==================  ===============================================================
``sequence_index``  int64 [S]           corpus row of each sequence
``lengths``         int32 [S]           tokens of each sequence (its positions are consecutive)
``input_ids``       int32 [T]           the model's tokenisation (special tokens included, as it reads them)
``offsets``         int32 [T, 2]        character span of each token in the text; -1 without a fast tokenizer
``topk_ids``        int32 [T, k]        the k most probable next tokens at each position, most probable first
``topk_logprobs``   float16 [T, k]      their log-probabilities under the full softmax (not renormalised)
``nll``             float64 [S]         summed −log p(gold next token) over positions 0..n−2
``characters``      int32 [S]           characters those gold tokens cover (for per-character MinCE)
=================  ==================  ===============================================================

Only real positions are stored (FuseChat's released code keeps top-10 logits at every position padded to 2048,
about 200 KB per example and model). Log-probabilities are float16 by default: they lie in [−65504, 0], where
float16's 11-bit significand is 8× finer than bfloat16's (an absolute error below 0.004 for log-probabilities
above −8, i.e. under 0.4% of a probability), at half float32's size; ``logprob_dtype: float32`` keeps them exact.
With k = 10 a token takes 4 + 8 + 40 + 20 = 72 bytes (72 MB per million tokens; ``benchmarks/fusion_store.py``
measures it). Each shard is written to a temporary file and renamed, then recorded in the manifest (model
fingerprint, corpus hash, k, shard list with sizes and SHA-256): a rerun keeps every recorded shard whose file
is intact and computes the others; only one shard's arrays are in memory at a time.

Fused targets (FuseChat, arXiv:2402.16107)
------------------------------------------
For pivot position t (whose distribution predicts pivot token t+1) the source's candidate distribution is:

- *paired*: the alignment puts t at the end of a group of tokens covering the same characters as a group of
  source tokens ending at s (both models have read the same text), and the next group holds one source token:
  the source's distribution at s, its ids mapped onto the pivot's vocabulary by the aligner (duplicates combined,
  unmapped mass dropped, renormalised). This covers one-to-one groups and many-to-one ones (several pivot tokens
  for one source token: the source predicts the whole token), as FuseChat's ``transform_step_logits`` does;
- *one-to-many*: the next pivot token covers several source tokens, so the source's distribution at s predicts
  only a piece of it: FuseChat uses a one-hot distribution on the gold pivot token there (``one_to_many: gold``,
  its ``transform_step_logits``); ``pivot`` uses the pivot's own distribution, ``skip`` no target;
- *unpaired*: t is inside a group, or no source position has read the same text: FuseChat's collator falls back
  to the pivot's own distribution (``unpaired: pivot``, its "bad case"); ``gold`` and ``skip`` as above.

The paper does not spell these cases out; the rules above are its released code's (FuseChat/train/
align_token_and_vocab.py and data_collator.py). One difference: that code pairs *tokens* (a DTW over token
strings) and gives pivot token i the distribution stored at its paired source token j, although the one
predicts token i+1 and the other token j+1; here a pivot position takes the source distribution computed after
the same text (:func:`pair_positions`), so both predict the same next characters.

Then, per sequence, the fusion function combines the pivot's own top-k distributions P and the aligned source's
Q (``fusion.function``):

- ``minimum_ce`` (MinCE, FuseChat's choice, its ``distill_greater_as_gt`` "hard"): the candidate of lower
  cross-entropy against the gold tokens of the sequence; a tie keeps the pivot's;
- ``avg`` (FuseLLM's AvgCE, arXiv:2401.10491, as FuseChat's ``distill_weighted_as_gt`` computes it): the mixture
  w_P·P + w_Q·Q per position, each renormalised over its k ids, with (w_P, w_Q) = softmax(exp(−CE_P), exp(−CE_Q));
  up to 2k ids per position;
- ``source``: always Q (plain distillation from the source, an ablation).

The cross-entropy of a candidate is its model's own (``fusion.cross_entropy``): ``token``, the mean log-loss per
gold token of its own tokenisation (FuseChat's released ``metric_ce``), or ``character``, per character of the
text predicted (our addition: it does not favour the tokenizer that cuts the text into more, easier tokens).

The fusion loss (:func:`fusion_loss`, FuseLLM arXiv:2401.10491; FuseChat)::

    L = λ · Σ_t −log p_θ(y_{t+1} | y_≤t) / N  +  (1 − λ) · Σ_t Σ_i −q_t,i · log p_θ(v_t,i | y_≤t) / N

over the label positions t (N of them), q_t = softmax(ℓ_t / T) the fused target's k log-probabilities ℓ_t
renormalised over their ids v_t; λ = 0.9 and T = 1 by default (the ``fusion`` finetuner's parameters).
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from .atomic import write_json
from .errors import MergeplugError
from .statistics import content_digest, file_sha256

#: Bump when what a store, target folder or step writes changes: older folders then stop matching any step.
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
IGNORE_INDEX = -100  # as mergeplug.finetuning: the label cross-entropy skips
#: The fusion finetuner's per-token fields (mergeplug.finetuning.Finetuner.EXTRA_FIELDS): the fused target of
#: the token at that position, as pivot ids (-1: none) and log-probabilities.
TARGET_IDS, TARGET_LOGPROBS = "fusion_ids", "fusion_logprobs"
FUSION_FUNCTIONS = ("minimum_ce", "avg", "source")
CROSS_ENTROPIES = ("token", "character")
FALLBACKS = ("pivot", "gold", "skip")
#: Kinds of pivot positions in a target folder (``kinds``), see the module docstring.
NO_LABEL, PAIRED, ONE_TO_MANY, UNPAIRED = 0, 1, 2, 3


# === settings ==============================================================================================
@dataclass(frozen=True)
class StoreSettings:
    """What determines a distribution store's content (``batch_size`` and the device only change speed).

    top_k: FuseChat's released ``--top_k_logits 10`` (arXiv:2402.16107); max_length: its ``model_max_length``
    2048 (capped at the model's context); shard_sequences and logprob_dtype: our choices (module docstring).
    """

    top_k: int = 10
    max_length: int = 2048
    shard_sequences: int = 1024
    logprob_dtype: str = "float16"

    def check(self) -> None:
        if self.top_k < 1:
            raise MergeplugError(f"top_k: {self.top_k}; keep at least one token per position")
        if self.max_length < 2:
            raise MergeplugError(f"max_length: {self.max_length}; a sequence needs two tokens to predict one")
        if self.shard_sequences < 1:
            raise MergeplugError(f"shard_sequences: {self.shard_sequences}; give a positive number")
        if self.logprob_dtype not in ("float16", "float32"):
            raise MergeplugError(f"logprob_dtype: {self.logprob_dtype!r}; use float16 or float32")


@dataclass(frozen=True)
class FusionSettings:
    """How fused targets are built (module docstring): FuseChat's choices by default (arXiv:2402.16107)."""

    function: str = "minimum_ce"
    cross_entropy: str = "token"
    unpaired: str = "pivot"
    one_to_many: str = "gold"

    def check(self) -> None:
        for name, value, allowed in (("function", self.function, FUSION_FUNCTIONS),
                                     ("cross_entropy", self.cross_entropy, CROSS_ENTROPIES),
                                     ("unpaired", self.unpaired, FALLBACKS),
                                     ("one_to_many", self.one_to_many, FALLBACKS)):
            if value not in allowed:
                raise MergeplugError(f"fusion.{name}: {value!r}; use one of {', '.join(allowed)}")


# === small helpers =========================================================================================
def _write_json_atomic(path: Path, data: Any) -> None:
    write_json(path, data, sort_keys=True, ensure_ascii=True)


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not progress, leave=False)


def corpus_hash(texts: Sequence[str]) -> str:
    """SHA-256 of the corpus texts in order: part of every step's identity."""
    return content_digest(list(texts))


def model_identity(folder: str | Path) -> dict:
    """What identifies a local model for a step: its weights' fingerprint (config, weight files' names, sizes,
    times; :func:`mergeplug.statistics.model_fingerprint`) and a hash of its tokenizer files."""
    from .statistics import model_fingerprint

    folder = Path(folder)
    tokenizer = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens"))
                               or path.suffix == ".model"):
            tokenizer.update(path.name.encode() + b"\0" + path.read_bytes())
    return {**model_fingerprint(str(folder)), "tokenizer": tokenizer.hexdigest()}


# === the corpus ============================================================================================
def read_corpus(corpus: dict, *, relative_to: Path | None = None) -> list[str]:
    """The texts of the fusion corpus: local JSONL/JSON/parquet/CSV files (``data_files`` or ``data_dir``,
    ``split``, ``limit``) whose ``column`` (default ``text``; a dotted path reaches into nested fields) holds
    each text. Relative paths are read from the working directory, else from ``relative_to`` (the recipe's
    folder). Empty texts are dropped with a warning; a non-text value is an error naming its row."""
    from .data import load_rows

    source = {k: corpus[k] for k in ("data_dir", "data_files", "split", "limit") if k in corpus}
    if "data_files" not in source and "data_dir" not in source:
        raise MergeplugError("corpus: give data_files (JSONL, JSON, parquet or CSV files) or data_dir, with a "
                             "text column (column: NAME, default text)")

    def located(path: str) -> str:
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or candidate.exists() or relative_to is None:
            return str(candidate)
        return str(relative_to / candidate) if (relative_to / candidate).exists() else str(candidate)

    if "data_dir" in source:
        source["data_dir"] = located(source["data_dir"])
    if "data_files" in source:
        files = source["data_files"]
        source["data_files"] = located(files) if isinstance(files, str) else [located(f) for f in files]
    column = corpus.get("column", "text")
    rows = load_rows({"columns": {"text": column}, "split": "train"}, source=source, label="corpus").rows
    texts, empty = [], 0
    for i, row in enumerate(rows):
        text = row["text"]
        if not isinstance(text, str):
            raise MergeplugError(f"corpus: row {i}: column {column!r} holds a {type(text).__name__}, not a text; "
                                 "name the text column with corpus.column")
        if text.strip():
            texts.append(text)
        else:
            empty += 1
    if empty:
        warnings.warn(f"corpus: dropped {empty} empty text(s) of {len(rows)}", stacklevel=2)
    if not texts:
        raise MergeplugError(f"corpus: no text in column {column!r} ({len(rows)} rows)")
    return texts


def sequence_order(texts: Sequence[str]) -> list[int]:
    """Corpus rows longest text first (ties in corpus order): the order sequences are stored in, the same for
    every model, so their shards hold the same texts."""
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


# === sharded folders =======================================================================================
class ShardedFolder:
    """A folder of safetensors shards and a manifest naming what made them (``identity``).

    A shard is written to a temporary file, renamed, then recorded in the manifest with its size and SHA-256;
    on reopening, a recorded shard whose file is missing or differs is computed again. A folder made with
    another identity is an error (its steps' folders are content-addressed, so this means a hand-made mix-up).
    """

    def __init__(self, folder: str | Path, identity: dict, *, kind: str):
        self.folder = Path(folder)
        self.identity = identity
        self.kind = kind
        path = self.folder / MANIFEST_FILE
        if path.is_file():
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("identity") != identity:
                changed = sorted(k for k in set(identity) | set(manifest.get("identity", {}))
                                 if identity.get(k) != manifest.get("identity", {}).get(k))
                raise MergeplugError(f"{self.folder}: holds a {kind} made with other settings ({', '.join(changed)});"
                                     " remove the folder or write elsewhere")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            manifest = {"kind": kind, "format": FORMAT_VERSION, "identity": identity, "shards": {},
                        "complete": False}
            _write_json_atomic(path, manifest)
        self.manifest = manifest

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shard-{index:05d}.safetensors"

    def done(self, index: int, *, verify: bool = True) -> bool:
        record = self.manifest["shards"].get(str(index))
        if record is None:
            return False
        path = self.folder / record["file"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            return False
        return not verify or file_sha256(path) == record["sha256"]

    def write(self, index: int, arrays: dict[str, np.ndarray], **record: Any) -> None:
        from safetensors.numpy import save_file

        name = self.shard_name(index)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        # One metadata entry: safetensors writes them in its hash map's order, random per process, and the same
        # arrays must make the same file (and SHA-256) in any process.
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                  metadata={"format": f"mergeplug-{self.kind} {FORMAT_VERSION}"})
        os.replace(tmp, self.folder / name)
        path = self.folder / name
        self.manifest["shards"][str(index)] = {"file": name, "bytes": path.stat().st_size,
                                               "sha256": file_sha256(path), **record}
        self.manifest["complete"] = False
        _write_json_atomic(self.folder / MANIFEST_FILE, self.manifest)

    def finish(self, **summary: Any) -> None:
        self.manifest.update(summary)
        self.manifest["complete"] = True
        _write_json_atomic(self.folder / MANIFEST_FILE, self.manifest)


class ShardedReader:
    """A complete sharded folder (a distribution store or a target folder), read one shard at a time."""

    def __init__(self, folder: str | Path, kind: str):
        self.folder = Path(folder)
        path = self.folder / MANIFEST_FILE
        if not path.is_file():
            raise MergeplugError(f"{self.folder}: no {kind} here (no {MANIFEST_FILE})")
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        if self.manifest.get("kind") != kind or not self.manifest.get("complete"):
            raise MergeplugError(f"{self.folder}: not a complete {kind}; run the step that writes it again")
        self.identity: dict = self.manifest["identity"]

    @property
    def shard_count(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, index: int) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        record = self.manifest["shards"].get(str(index))
        if record is None:
            raise MergeplugError(f"{self.folder}: has no shard {index}")
        path = self.folder / record["file"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            raise MergeplugError(f"{path}: missing or truncated; run the step again (it recomputes this shard)")
        return load_file(str(path))

    def shards(self) -> Iterator[dict[str, np.ndarray]]:
        for index in range(self.shard_count):
            yield self.shard(index)

    @property
    def nbytes(self) -> int:
        return sum(record["bytes"] for record in self.manifest["shards"].values())


class DistributionStore(ShardedReader):
    """A complete distribution store (module docstring), read shard by shard."""

    def __init__(self, folder: str | Path):
        super().__init__(folder, "distribution store")

    @property
    def top_k(self) -> int:
        return int(self.identity["top_k"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def sequences(self) -> int:
        return int(self.manifest["sequences"])

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / max(self.tokens, 1)


def split_sequences(shard: dict[str, np.ndarray]) -> list[slice]:
    """The token rows of each sequence of a shard, in its order."""
    ends = np.cumsum(shard["lengths"].astype(np.int64))
    starts = ends - shard["lengths"]
    return [slice(int(a), int(b)) for a, b in zip(starts, ends)]


# === step 1: the distribution store ========================================================================
def record_distributions(model: str | Path, texts: Sequence[str], folder: str | Path, *,
                         settings: StoreSettings = StoreSettings(), batch_size: int = 8, device: str = "auto",
                         progress: bool = True, label: str = "model") -> DistributionStore:
    """Run the causal LM in folder ``model`` over ``texts`` and store its top-k next-token distributions at every
    real position into ``folder`` (module docstring: layout, resumption). Batches of ``batch_size`` sequences of
    similar length, padded on the right with an attention mask; ``device`` auto, cpu, cuda or mps."""
    settings.check()
    if batch_size < 1:
        raise MergeplugError(f"batch_size: {batch_size}; give a positive number")
    model = Path(model)
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    if not getattr(tokenizer, "is_fast", False):
        warnings.warn(f"{label} ({model}): no fast tokenizer, hence no character offsets: its positions will be "
                      "aligned by FuseLLM's edit-distance DP (arXiv:2401.10491), slower and less exact", stacklevel=2)
    context = getattr(AutoConfig.from_pretrained(str(model)), "max_position_embeddings", None)
    max_length = min(settings.max_length, context) if isinstance(context, int) else settings.max_length
    identity = {"format": FORMAT_VERSION, "model": model_identity(model), "corpus": corpus_hash(texts),
                **asdict(settings), "max_length": max_length}
    store = ShardedFolder(folder, identity, kind="distribution store")
    order = sequence_order(texts)
    chunks = [order[i:i + settings.shard_sequences] for i in range(0, len(order), settings.shard_sequences)]
    todo = [i for i in range(len(chunks)) if not store.done(i)]
    if todo:
        lm, where = _load_model(model, device)
        with _bar(sum(len(chunks[i]) for i in todo), f"record {label}", progress) as bar:
            for i in todo:
                arrays = _record_shard(lm, where, tokenizer, texts, chunks[i], settings, max_length, batch_size, bar)
                store.write(i, arrays, sequences=len(chunks[i]), tokens=int(arrays["lengths"].sum()))
    records = [store.manifest["shards"][str(i)] for i in range(len(chunks))]
    store.finish(sequences=len(order), tokens=sum(r["tokens"] for r in records), shard_count=len(chunks))
    return DistributionStore(folder)


def _load_model(folder: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from .engine import resolve_device

    where = resolve_device(device)
    dtype = torch.float32 if where == "cpu" else "auto"  # GPUs read the stored dtype (bf16), as FuseChat does
    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(where).eval()
    return lm, where


def _record_shard(lm, where: str, tokenizer, texts: Sequence[str], rows: list[int], settings: StoreSettings,
                  max_length: int, batch_size: int, bar) -> dict[str, np.ndarray]:
    import torch

    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer([texts[i] for i in rows], truncation=True, max_length=max_length,
                        return_offsets_mapping=fast, return_attention_mask=False, return_token_type_ids=False)
    ids_list = [list(ids) for ids in encoded["input_ids"]]
    lp_dtype = np.float16 if settings.logprob_dtype == "float16" else np.float32
    out_ids, out_lp, nll, characters = [], [], np.zeros(len(rows)), np.zeros(len(rows), np.int32)
    for lo in range(0, len(rows), batch_size):
        batch = ids_list[lo:lo + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, ids in enumerate(batch):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
        with torch.no_grad():
            logits = lm(input_ids=input_ids.to(where), attention_mask=mask.to(where)).logits
            if settings.top_k > logits.shape[-1]:
                raise MergeplugError(f"top_k: {settings.top_k} is more than the model's {logits.shape[-1]} "
                                     "vocabulary entries; lower top_k")
            for r, ids in enumerate(batch):
                # One row at a time in float32: log p = logit - logsumexp, no [batch, length, vocabulary] copy.
                n = len(ids)
                row = logits[r, :n].float()
                norm = torch.logsumexp(row, dim=-1, keepdim=True)
                values, indices = row.topk(settings.top_k, dim=-1)
                gold = row[:-1].gather(-1, input_ids[r, 1:n].to(where).unsqueeze(-1)) - norm[:-1]
                out_ids.append(indices.cpu().numpy().astype(np.int32))
                out_lp.append((values - norm).cpu().numpy().astype(lp_dtype))
                nll[lo + r] = -float(gold.double().sum())
            del logits
        bar.update(len(batch))
    if fast:
        offsets = [np.asarray(o, dtype=np.int32).reshape(-1, 2) for o in encoded["offset_mapping"]]
        for r, (ids, spans) in enumerate(zip(ids_list, offsets)):
            characters[r] = _predicted_characters(spans, len(texts[rows[r]]))
    else:  # no offsets: the whole text stands for what was predicted (exact unless max_length cut it)
        offsets = [np.full((len(ids), 2), -1, np.int32) for ids in ids_list]
        for r, ids in enumerate(ids_list):
            characters[r] = len(texts[rows[r]])
    k = settings.top_k
    return {
        "sequence_index": np.asarray(rows, dtype=np.int64),
        "lengths": np.asarray([len(ids) for ids in ids_list], dtype=np.int32),
        "input_ids": np.concatenate([np.asarray(ids, np.int32) for ids in ids_list]) if ids_list else np.zeros(0, np.int32),
        "offsets": np.concatenate(offsets) if offsets else np.zeros((0, 2), np.int32),
        "topk_ids": np.concatenate(out_ids) if out_ids else np.zeros((0, k), np.int32),
        "topk_logprobs": np.concatenate(out_lp) if out_lp else np.zeros((0, k), lp_dtype),
        "nll": nll,
        "characters": characters,
    }


def _predicted_characters(spans: np.ndarray, text_length: int) -> int:
    """Characters covered by tokens 1..n−1 (the gold tokens a sequence's positions predict)."""
    if spans.shape[0] < 2:
        return 0
    real = spans[1:][spans[1:, 1] > spans[1:, 0]]
    return int(real[:, 1].max() - real[:, 0].min()) if real.size else 0


# === step 2: fused targets =================================================================================
def _tokenizations(tokenizer, texts: Sequence[str], shard: dict[str, np.ndarray]) -> list:
    """The stored tokenisations of a shard as :class:`mergeplug.alignment.Tokenization` objects."""
    from .alignment import Tokenization, Vocabulary

    vocab = Vocabulary.of(tokenizer)
    out = []
    for row, rows in zip(shard["sequence_index"].tolist(), split_sequences(shard)):
        ids = shard["input_ids"][rows].astype(np.int64)
        offsets = shard["offsets"][rows].astype(np.int64)
        known = offsets.size == 0 or bool((offsets >= 0).all())
        inside = (ids >= 0) & (ids < vocab.size)
        roles = np.where(inside, vocab.roles[np.where(inside, ids, 0)], 0)
        out.append(Tokenization(texts[row], tokenizer.convert_ids_to_tokens(ids.tolist()),
                                offsets if known else None, ids, roles, vocab.scheme))
    return out


def pair_positions(alignment) -> tuple[np.ndarray, np.ndarray]:
    """For each pivot position t of an aligned sequence: the source position whose next-token distribution is
    t's candidate (-1 for none) and the position's kind (PAIRED, ONE_TO_MANY, UNPAIRED; NO_LABEL for the last).

    t is paired with s when the alignment ends a group at t and s (both models have read the same text,
    :meth:`~mergeplug.alignment.SequenceAlignment.pivot_to_source`) and the next pivot token starts the next
    group, whose first source token is s+1: one source token in that group is PAIRED (one-to-one, or
    many-to-one: the source predicts the whole token), several ONE_TO_MANY (the source predicts only a piece).
    Everything else is UNPAIRED."""
    pivot_group, source_group = alignment.pivot_group, alignment.source_group
    n = pivot_group.shape[0]
    kinds = np.full(n, UNPAIRED, np.int8)
    source_at = np.full(n, -1, np.int64)
    if n:
        kinds[-1] = NO_LABEL
    if n < 2:
        return source_at, kinds
    at = alignment.pivot_to_source("end")
    _, source_sizes = alignment.group_sizes()
    t = np.arange(n - 1)
    s = at[:-1]
    next_group = pivot_group[1:]
    s_next = np.minimum(s + 1, max(source_group.shape[0] - 1, 0))
    ok = (s >= 0) & (next_group >= 0) & (s + 1 < source_group.shape[0])
    ok &= np.where(ok, source_group[s_next] == next_group, False)
    single = np.where(ok, source_sizes[np.maximum(next_group, 0)] == 1, False)
    kinds[t[ok & single]] = PAIRED
    kinds[t[ok & ~single]] = ONE_TO_MANY
    source_at[t[ok & single]] = s[ok & single]
    return source_at, kinds


def sequence_cross_entropy(nll: float, length: int, characters: int, how: str) -> float:
    """A model's cross-entropy against a sequence's gold tokens: per token of its own tokenisation (``token``,
    FuseChat's metric_ce) or per character predicted (``character``); +inf when it predicts nothing."""
    count = max(length - 1, 0) if how == "token" else characters
    return float(nll) / count if count > 0 else float("inf")


def _renormalised(logprobs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Log-probabilities renormalised over each row's valid ids (-1 ids are padding)."""
    lp = np.where(ids >= 0, logprobs.astype(np.float64), -np.inf)
    peak = lp.max(axis=1, keepdims=True) if lp.shape[1] else np.zeros((lp.shape[0], 1))
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # rows without ids: -inf, never read
        total = np.log(np.exp(lp - peak).sum(axis=1, keepdims=True)) + peak
        return np.where(ids >= 0, lp - total, -np.inf)


def _merge_duplicates(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: entries sharing an id combined (log-sum-exp), sorted by probability, padding (-1, -inf) last."""
    rows, width = ids.shape
    out_ids = np.full((rows, width), -1, np.int64)
    out_lp = np.full((rows, width), -np.inf)
    for r in range(rows):
        valid = ids[r] >= 0
        if not valid.any():
            continue
        unique, inverse = np.unique(ids[r][valid], return_inverse=True)
        mass = np.bincount(inverse.reshape(-1), weights=np.exp(logprobs[r][valid]), minlength=unique.size)
        order = np.argsort(-mass, kind="stable")
        out_ids[r, :unique.size] = unique[order]
        out_lp[r, :unique.size] = np.log(mass[order])
    return out_ids, out_lp


def fuse_sequence(pivot_ids: np.ndarray, pivot_logprobs: np.ndarray, source_ids: np.ndarray,
                  source_logprobs: np.ndarray, pivot_ce: float, source_ce: float,
                  function: str = "minimum_ce") -> tuple[np.ndarray, np.ndarray, float]:
    """The fused target of one sequence from the pivot's own candidate P and the aligned source's Q (both
    [positions, k] pivot ids, -1 padding) and their cross-entropies: ``(ids, logprobs, source_weight)``.

    ``minimum_ce``: the candidate of lower cross-entropy, the pivot's on a tie (FuseChat, arXiv:2402.16107);
    ``avg``: w_P·P + w_Q·Q with (w_P, w_Q) = softmax(exp(−CE_P), exp(−CE_Q)) (FuseLLM's AvgCE, arXiv:2401.10491,
    as FuseChat's released code weights), each renormalised over its ids first, [positions, 2k];
    ``source``: Q. Rows come back renormalised over their valid ids.
    """
    if function == "minimum_ce":
        if source_ce < pivot_ce:
            return source_ids, _renormalised(source_logprobs, source_ids), 1.0
        return pivot_ids, _renormalised(pivot_logprobs, pivot_ids), 0.0
    if function == "source":
        return source_ids, _renormalised(source_logprobs, source_ids), 1.0
    if function != "avg":
        raise MergeplugError(f"fusion.function: {function!r}; use one of {', '.join(FUSION_FUNCTIONS)}")
    rewards = np.exp(-np.array([pivot_ce, source_ce], dtype=np.float64))
    weights = np.exp(rewards - rewards.max())
    weights /= weights.sum()
    ids = np.concatenate([pivot_ids, source_ids], axis=1)
    lp = np.concatenate([_renormalised(pivot_logprobs, pivot_ids) + np.log(weights[0]),
                         _renormalised(source_logprobs, source_ids) + np.log(weights[1])], axis=1)
    # A row where one candidate has no ids keeps the other's whole mass.
    merged_ids, merged_lp = _merge_duplicates(ids, np.where(ids >= 0, lp, -np.inf))
    return merged_ids, _renormalised(merged_lp, merged_ids), float(weights[1])


def _fallback(kind: str, pivot_ids: np.ndarray, pivot_lp: np.ndarray, gold: np.ndarray, width: int):
    """Rows for positions without a source distribution: the pivot's own, one-hot on the gold token, or none."""
    rows = pivot_ids.shape[0]
    ids = np.full((rows, width), -1, np.int64)
    lp = np.full((rows, width), -np.inf)
    if kind == "pivot":
        ids[:, :pivot_ids.shape[1]] = pivot_ids
        lp[:, :pivot_ids.shape[1]] = pivot_lp
    elif kind == "gold":
        ids[:, 0] = gold
        lp[:, 0] = 0.0
    return ids, lp


def aligned_source(alignment, pivot_ids: np.ndarray, pivot_topk: tuple[np.ndarray, np.ndarray],
                   mapped: tuple[np.ndarray, np.ndarray], settings: FusionSettings) -> tuple:
    """The source's candidate distribution at each pivot position: ``(ids, logprobs, kinds)``.

    ``mapped``: the source's distributions at the positions :func:`pair_positions` pairs, already on pivot ids,
    in pivot-position order. ONE_TO_MANY and UNPAIRED positions (and PAIRED ones whose distribution lost all
    its mass in the mapping, counted as UNPAIRED) take ``settings.one_to_many`` / ``settings.unpaired``."""
    source_at, kinds = pair_positions(alignment)
    n, k = pivot_topk[0].shape
    width = max(k, mapped[0].shape[1] if mapped[0].ndim == 2 else k)
    gold = np.append(pivot_ids[1:], -1)
    ids = np.full((n, width), -1, np.int64)
    lp = np.full((n, width), -np.inf)
    paired = np.flatnonzero(kinds == PAIRED)
    if paired.size:
        ids[paired, :mapped[0].shape[1]] = mapped[0]
        lp[paired, :mapped[1].shape[1]] = mapped[1]
        lost = paired[(ids[paired] < 0).all(axis=1)]
        kinds[lost] = UNPAIRED
    for kind, how in ((ONE_TO_MANY, settings.one_to_many), (UNPAIRED, settings.unpaired)):
        rows = np.flatnonzero(kinds == kind)
        if rows.size:
            ids[rows], lp[rows] = _fallback(how, pivot_topk[0][rows], pivot_topk[1][rows], gold[rows], width)
    last = np.flatnonzero(kinds == NO_LABEL)
    ids[last], lp[last] = -1, -np.inf
    return ids, lp, kinds


def fit_aligner(name: str, parameters: dict, source_tokenizer, pivot_tokenizer, corpus_pairs=None):
    """The aligner plugin ``name`` fitted to (source, pivot); ``corpus_pairs`` (an iterable of (source, pivot)
    Tokenization pairs) is read only by aligners that learn from data (``statistical``)."""
    from .alignment import TokenAligner
    from .plugins import get_registry

    cls = get_registry().get("aligner", name).load()
    if not (isinstance(cls, type) and issubclass(cls, TokenAligner)):
        raise MergeplugError(f"aligner {name}: registers {cls!r}, not a subclass of mergeplug.alignment.TokenAligner")
    return cls(parameters).fit(source_tokenizer, pivot_tokenizer, corpus_pairs)


def corpus_pairs(pivot: DistributionStore, source: DistributionStore, pivot_tokenizer, source_tokenizer,
                 texts: Sequence[str]) -> Iterator[tuple]:
    """(source, pivot) Tokenization pairs of every corpus text, read from the two stores shard by shard."""
    for index in range(pivot.shard_count):
        pivot_toks = _tokenizations(pivot_tokenizer, texts, pivot.shard(index))
        source_toks = _tokenizations(source_tokenizer, texts, source.shard(index))
        yield from zip(source_toks, pivot_toks)


def build_targets(pivot: DistributionStore, source: DistributionStore, aligner, pivot_tokenizer, source_tokenizer,
                  texts: Sequence[str], folder: str | Path, *, settings: FusionSettings = FusionSettings(),
                  identity: dict | None = None, progress: bool = True, label: str = "source") -> ShardedReader:
    """Fused targets for the pivot against one source (module docstring), written shard by shard into
    ``folder``: per pivot token ``target_ids`` int32 [T, K] and ``target_logprobs`` [T, K] (row t: the target
    for predicting token t+1; padding -1 / -inf), ``kinds`` int8 [T]; per sequence ``source_weight`` float32 (1
    where MinCE chose the source) and the pivot store's ``sequence_index`` and ``lengths``."""
    settings.check()
    for what in ("corpus", "shard_sequences"):
        if pivot.identity[what] != source.identity[what]:
            raise MergeplugError(f"{pivot.folder} and {source.folder}: stores of different {what}; record both "
                                 "on the same corpus with the same settings")
    identity = identity or {"format": FORMAT_VERSION, "pivot": pivot.identity, "source": source.identity,
                            "aligner": aligner.name, "aligner_parameters": aligner.parameters, **asdict(settings)}
    out = ShardedFolder(folder, identity, kind="fused targets")
    lp_dtype = np.float16 if pivot.identity["logprob_dtype"] == "float16" else np.float32
    counts = {"positions": 0, "paired": 0, "one_to_many": 0, "unpaired": 0, "sequences": 0, "source_chosen": 0.0}
    with _bar(pivot.sequences, f"align {label}", progress) as bar:
        for index in range(pivot.shard_count):
            p_shard, s_shard = pivot.shard(index), source.shard(index)
            if not np.array_equal(p_shard["sequence_index"], s_shard["sequence_index"]):
                raise MergeplugError(f"{pivot.folder} shard {index}: holds other texts than {source.folder}'s")
            if out.done(index):
                record = out.manifest["shards"][str(index)]
                for key in counts:
                    counts[key] += record[key]
                bar.update(len(p_shard["lengths"]))
                continue
            arrays, stats = _targets_of_shard(p_shard, s_shard, aligner, pivot_tokenizer, source_tokenizer, texts,
                                              settings, lp_dtype)
            out.write(index, arrays, **stats)
            for key in counts:
                counts[key] += stats[key]
            bar.update(len(p_shard["lengths"]))
    out.finish(**counts)
    return ShardedReader(folder, "fused targets")


def _targets_of_shard(p_shard, s_shard, aligner, pivot_tokenizer, source_tokenizer, texts, settings: FusionSettings,
                      lp_dtype) -> tuple[dict, dict]:
    """One shard's fused targets and its counts (positions by kind, sequences, MinCE choices)."""
    from .alignment import align_many

    pivot_toks = _tokenizations(pivot_tokenizer, texts, p_shard)
    source_toks = _tokenizations(source_tokenizer, texts, s_shard)
    alignments = align_many(pivot_toks, source_toks)
    p_rows, s_rows = split_sequences(p_shard), split_sequences(s_shard)
    # Map every paired source distribution of the shard in one call.
    pairs = [pair_positions(a) for a in alignments]
    picked = np.concatenate([s_rows[i].start + at[kinds == PAIRED] for i, (at, kinds) in enumerate(pairs)]
                            ) if pairs else np.zeros(0, np.int64)
    mapped_ids, mapped_lp = aligner.map_distribution(s_shard["topk_ids"][picked].astype(np.int64),
                                                     s_shard["topk_logprobs"][picked].astype(np.float32))
    mapped_ids, mapped_lp = np.asarray(mapped_ids), np.asarray(mapped_lp, dtype=np.float64)
    pivot_k = p_shard["topk_ids"].shape[1]
    width = max(pivot_k, mapped_ids.shape[1]) * (2 if settings.function == "avg" else 1)
    out_ids, out_lp, out_kinds, weights = [], [], [], []
    stats = {"positions": 0, "paired": 0, "one_to_many": 0, "unpaired": 0, "sequences": len(alignments),
             "source_chosen": 0.0}
    cursor = 0
    for i, alignment in enumerate(alignments):
        rows = p_rows[i]
        pivot_ids = p_shard["input_ids"][rows].astype(np.int64)
        topk = (p_shard["topk_ids"][rows].astype(np.int64), p_shard["topk_logprobs"][rows].astype(np.float64))
        n_paired = int((pairs[i][1] == PAIRED).sum())
        mapped = (mapped_ids[cursor:cursor + n_paired], mapped_lp[cursor:cursor + n_paired])
        cursor += n_paired
        q_ids, q_lp, kinds = aligned_source(alignment, pivot_ids, topk, mapped, settings)
        p_ids = np.full_like(q_ids, -1)
        p_lp = np.full(q_ids.shape, -np.inf)
        p_ids[:, :pivot_k], p_lp[:, :pivot_k] = topk
        p_ids[kinds == NO_LABEL], p_lp[kinds == NO_LABEL] = -1, -np.inf
        ce_p = sequence_cross_entropy(p_shard["nll"][i], int(p_shard["lengths"][i]), int(p_shard["characters"][i]),
                                      settings.cross_entropy)
        ce_s = sequence_cross_entropy(s_shard["nll"][i], int(s_shard["lengths"][i]), int(s_shard["characters"][i]),
                                      settings.cross_entropy)
        ids, lp, weight = fuse_sequence(p_ids, p_lp, q_ids, q_lp, ce_p, ce_s, settings.function)
        padded_ids = np.full((ids.shape[0], width), -1, np.int64)
        padded_lp = np.full((ids.shape[0], width), -np.inf)
        padded_ids[:, :ids.shape[1]], padded_lp[:, :ids.shape[1]] = ids[:, :width], lp[:, :width]
        padded_ids[kinds == NO_LABEL], padded_lp[kinds == NO_LABEL] = -1, -np.inf
        out_ids.append(padded_ids)
        out_lp.append(padded_lp)
        out_kinds.append(kinds)
        weights.append(weight)
        labelled = kinds != NO_LABEL
        stats["positions"] += int(labelled.sum())
        stats["paired"] += int((kinds == PAIRED).sum())
        stats["one_to_many"] += int((kinds == ONE_TO_MANY).sum())
        stats["unpaired"] += int((kinds == UNPAIRED).sum())
        stats["source_chosen"] += weight
    arrays = {
        "sequence_index": p_shard["sequence_index"],
        "lengths": p_shard["lengths"],
        "target_ids": (np.concatenate(out_ids) if out_ids else np.zeros((0, width))).astype(np.int32),
        "target_logprobs": (np.concatenate(out_lp) if out_lp else np.zeros((0, width))).astype(lp_dtype),
        "kinds": (np.concatenate(out_kinds) if out_kinds else np.zeros(0)).astype(np.int8),
        "source_weight": np.asarray(weights, dtype=np.float32),
    }
    return arrays, stats


# === step 3: the fusion loss and the training examples ====================================================
def fusion_loss(logits, labels, target_ids, target_logprobs, *, lm_weight: float = 0.9, temperature: float = 1.0,
                num_items_in_batch: Any = None):
    """L = λ·L_LM + (1−λ)·L_fusion on one batch (module docstring; FuseLLM arXiv:2401.10491, FuseChat
    arXiv:2402.16107; λ = 0.9, T = 1 their defaults).

    ``logits`` [B, L, V]; ``labels`` [B, L] (IGNORE_INDEX where no loss); ``target_ids`` [B, L, K] pivot ids (-1
    padding) and ``target_logprobs`` [B, L, K]: at position j the target for token j, as ``labels`` (the logits
    at j−1 predict it). Both terms are summed over the label positions and divided by ``num_items_in_batch``
    (the count over the whole accumulated batch) when given, else by this batch's label count. A label position
    whose target has no id adds nothing to the fusion sum.
    """
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    gold = labels[:, 1:]
    mask = gold != IGNORE_INDEX
    lm = -logp.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lm_sum = (lm * mask).sum()
    ids = target_ids[:, 1:].long()
    valid = ids >= 0
    has_target = valid.any(dim=-1)
    raw = target_logprobs[:, 1:].float() / temperature
    scaled = torch.where(valid, raw, torch.full_like(raw, float("-inf")))
    scaled = torch.where(has_target.unsqueeze(-1), scaled, torch.zeros_like(scaled))
    q = torch.softmax(scaled, dim=-1) * valid
    fusion = -(q * logp.gather(-1, ids.clamp(min=0))).sum(dim=-1)
    fusion_sum = (fusion * (mask & has_target)).sum()
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    return (lm_weight * lm_sum + (1.0 - lm_weight) * fusion_sum) / count


def fusion_examples(pivot: DistributionStore, targets: ShardedReader) -> list[dict]:
    """Training examples of the fusion finetuner, in corpus order: the pivot's stored tokenisation as
    ``input_ids``, ``labels`` the same ids (IGNORE_INDEX on the first, which nothing in its example predicts),
    and the targets moved one row down (row j: the target of token j, from the pivot's position j−1)."""
    examples: list[tuple[int, dict]] = []
    for index in range(pivot.shard_count):
        p_shard, t_shard = pivot.shard(index), targets.shard(index)
        if not np.array_equal(p_shard["sequence_index"], t_shard["sequence_index"]):
            raise MergeplugError(f"{targets.folder} shard {index}: holds other texts than the pivot store's")
        for row, rows in zip(p_shard["sequence_index"].tolist(), split_sequences(p_shard)):
            ids = p_shard["input_ids"][rows].astype(np.int64).tolist()
            width = t_shard["target_ids"].shape[1]
            t_ids = np.full((len(ids), width), -1, np.int64)
            t_lp = np.zeros((len(ids), width), np.float32)
            t_ids[1:] = t_shard["target_ids"][rows][:-1]
            t_lp[1:] = np.where(t_ids[1:] >= 0, t_shard["target_logprobs"][rows][:-1].astype(np.float32), 0.0)
            examples.append((row, {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:],
                                   TARGET_IDS: t_ids, TARGET_LOGPROBS: t_lp}))
    examples.sort(key=lambda pair: pair[0])
    return [example for _, example in examples]


# === several processes =====================================================================================
#: Seconds between two looks of a waiting process at what it waits for (a manifest or marker read). Our
#: choice: small next to any step, a negligible load on the file system.
POLL_SECONDS = 0.5
#: Seconds the main process, failing in a step the others wait for, waits for them to print its error, and
#: they for it to print it too: a launcher stops every process once one exits with an error, so each process
#: stays until the others have printed. Our choice; a process that never answers costs at most this.
ERROR_REPORT_SECONDS = 60.0
#: Seconds the other processes still stay once the main one has printed its error, so that it exits first and
#: a launcher names it as the root cause (torchrun then stops them). Our choice: above an interpreter's exit.
ERROR_MAIN_EXIT_SECONDS = 5.0
#: Markers in the work folder, each naming its launch: the main process's error (with its problems), one
#: ``error-reported-RANK.json`` per process that has printed it, and the main process's end of steps 1-2.
ERROR_FILE, MAIN_STEPS_FILE = "error.json", "main-steps.json"
_T = TypeVar("_T")


@dataclass(frozen=True)
class Processes:
    """This process's place among those a launcher started (module docstring, "Several processes").

    ``rank`` is the global rank (``RANK``; 0 is the main process, as ``mergeplug finetune`` takes it) and
    ``launch`` names the launch (torchrun's rendezvous id, which ``accelerate launch`` and ``torchrun
    --standalone`` draw at random, its restart count and the master's address), so a process honours only the
    markers of its own launch."""

    rank: int = 0
    world_size: int = 1
    launch: str = ""

    @classmethod
    def from_environment(cls) -> "Processes":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise MergeplugError(f"fuse: run it as one process (unset WORLD_SIZE, {world_size} here), or through "
                                 "torchrun or accelerate launch, which also set RANK, MASTER_ADDR and MASTER_PORT "
                                 f"(missing: {', '.join(missing)})")
        launch = "/".join(os.environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                                                                "MASTER_ADDR", "MASTER_PORT"))
        return cls(int(os.environ["RANK"]), world_size, launch)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @contextlib.contextmanager
    def main_steps(self, work: Path) -> Iterator[None]:
        """Around what the main process does alone before the training: it clears an earlier launch's markers
        first and writes :data:`MAIN_STEPS_FILE` last, or its error for the others; they leave only with
        one of the two, so none goes on (or exits content) while the main process fails."""
        if not self.several:
            yield
            return
        if self.main:
            for stale in (work / MAIN_STEPS_FILE, *work.glob("error*.json")):
                stale.unlink(missing_ok=True)
        try:
            yield
        except Exception as exc:
            if self.main:
                self._share_error(work, exc)
            raise
        if self.main:
            _write_json_atomic(work / MAIN_STEPS_FILE, {"launch": self.launch})
        else:
            self.wait_for(lambda: self._marker(work / MAIN_STEPS_FILE), work)

    def wait_for(self, ready: Callable[[], _T | None], work: Path) -> _T:
        """``ready()`` once it is not None, polled every :data:`POLL_SECONDS`; the main process's error (its
        marker in ``work``) raised here as it is. No time limit: a step may take hours, and a launcher stops
        this process when the main one dies without a word."""
        while True:
            found = ready()
            if found is not None:
                return found
            error = self._marker(work / ERROR_FILE)
            if error is not None:
                atexit.register(self._report_at_exit, work)
                raise MergeplugError(*error["problems"])
            time.sleep(POLL_SECONDS)

    def _marker(self, path: Path) -> dict | None:
        """The marker at ``path`` if this launch wrote it."""
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet
            return None
        return marker if marker.get("launch") == self.launch else None

    # The CLI prints an error on the way out, so a process writes that it has printed it at exit: the main
    # process exits once every other one has printed, and they stay until it has printed too.
    def _share_error(self, work: Path, exc: Exception) -> None:
        if isinstance(exc, MergeplugError):
            problems = list(exc.problems)
        else:
            first = (str(exc).strip().splitlines() or [""])[0]
            problems = [f"{type(exc).__name__}: {first} (on the main process; its output has the traceback)"]
        try:
            work.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(work / ERROR_FILE, {"launch": self.launch, "problems": problems})
        except OSError:
            return  # no marker: the launcher stops the others when this process exits
        self._wait_for_reports(work, range(1, self.world_size))
        atexit.register(self._reported, work)

    def _report_at_exit(self, work: Path) -> None:
        self._reported(work)
        if self._wait_for_reports(work, [0]):
            time.sleep(ERROR_MAIN_EXIT_SECONDS)

    def _reported(self, work: Path) -> None:
        try:
            _write_json_atomic(work / f"error-reported-{self.rank}.json", {"launch": self.launch})
        except OSError:
            pass  # the others then wait ERROR_REPORT_SECONDS, or the launcher stops them

    def _wait_for_reports(self, work: Path, ranks: Iterable[int]) -> bool:
        """True once every process of ``ranks`` has printed the error, False after :data:`ERROR_REPORT_SECONDS`."""
        waiting = {work / f"error-reported-{rank}.json" for rank in ranks}
        deadline = time.monotonic() + ERROR_REPORT_SECONDS
        while True:
            waiting = {path for path in waiting if self._marker(path) is None}
            if not waiting:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)


# === the pipeline ==========================================================================================
@dataclass
class FusePlan:
    """What ``mergeplug fuse`` does, every input resolved and checked before any model runs."""

    recipe: Any
    pivot: Path
    sources: list[Path]
    labels: list[str]  # "pivot", then one per source
    texts: list[str]
    store: StoreSettings
    fusion: FusionSettings
    batch_size: int
    device: str
    work: Path


def _label(folder: Path, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.name)[:40] or "model"
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    taken.add(label)
    return label


def work_folder(out: str | Path) -> Path:
    """Where ``mergeplug fuse`` keeps its steps for output ``out``: ``OUT.fuse-work`` beside it."""
    out = Path(out).expanduser().absolute()
    return out.parent / f"{out.name}.fuse-work"


def plan_fuse(recipe, out: str | Path, *, device: str | None = None, work: str | Path | None = None,
              registry=None) -> FusePlan:
    """Check a fuse recipe (a path or a checked recipe) and resolve its models and corpus; no model runs."""
    from .checkpoint import resolve_model
    from .recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, registry=registry, kind="fuse")
    elif recipe.kind != "fuse":
        raise MergeplugError(f"{recipe.source}: kind: this is a {recipe.kind} recipe, but a fuse recipe was expected")
    data = recipe.data
    relative_to = recipe.path.parent if recipe.path else None
    pivot = resolve_model(data["pivot"], label="pivot", relative_to=relative_to)
    sources = [resolve_model(ref, label=f"sources[{i}]", relative_to=relative_to)
               for i, ref in enumerate(data["sources"])]
    for path, where in [(pivot, "pivot"), *[(s, f"sources[{i}]") for i, s in enumerate(sources)]]:
        if not (path / "config.json").is_file():
            raise MergeplugError(f"{where} ({path}): no config.json; give a Hugging Face model folder")
    taken: set[str] = {"pivot"}
    labels = ["pivot"] + [_label(s, taken) for s in sources]
    texts = read_corpus(data["corpus"], relative_to=relative_to)
    store = StoreSettings(top_k=data["top_k"], max_length=data["max_length"],
                          shard_sequences=data["shard_sequences"], logprob_dtype=data["logprob_dtype"])
    store.check()
    fusion = FusionSettings(**data["fusion"])
    fusion.check()
    return FusePlan(recipe, pivot.resolve(), [s.resolve() for s in sources], labels, texts, store, fusion,
                    data["batch_size"], device or data["device"],
                    Path(work).expanduser().absolute() if work else work_folder(out))


def fuse(recipe, out: str | Path, *, force: bool = False, device: str | None = None, work: str | Path | None = None,
         progress: bool = True, registry=None) -> Path:
    """Run a fuse recipe into ``out`` (module docstring): record, align, finetune, merge; each finished step
    under the work folder is reused. ``out`` is written only once the merged model is complete.

    Under ``torchrun`` or ``accelerate launch`` every process calls it (module docstring, "Several
    processes"); the main one writes ``out``, the others return its path once their share of the training
    is done."""
    from .checkpoint import replace_folder
    from .engine import check_output

    processes = Processes.from_environment()
    out = Path(out).expanduser().absolute()
    if not processes.several:
        check_output(out, force)
    plan = plan_fuse(recipe, out, device=device, work=work, registry=registry)
    from .engine import resolve_device
    from .finetuning import check_device, end_distributed_run

    resolve_device(plan.device)  # a clear error for a missing GPU before anything runs
    check_device(plan.device)  # training takes auto, cpu, cuda or mps (one GPU per process)
    progress = progress and processes.main
    with processes.main_steps(plan.work):
        if processes.several and processes.main:
            check_output(out, force)
        if processes.main:
            plan.work.mkdir(parents=True, exist_ok=True)
        _say(f"fuse: {len(plan.sources)} source(s) into pivot {plan.pivot}; {len(plan.texts)} corpus texts; "
             f"steps in {plan.work}" + (f"; {processes.world_size} processes" if processes.several else ""),
             progress)
        stores = _record_step(plan, progress, processes)
        targets = _align_step(plan, stores, progress, processes)
    models = _finetune_step(plan, stores[0], targets, progress, processes)
    if processes.several:
        end_distributed_run()  # every process, once: the process group outlived each target's training
        if not processes.main:
            return out
    staged = _merge_step(plan, models, targets, out, progress)
    check_output(out, force)
    replace_folder(staged, out)
    _say(f"fuse: wrote {out}", progress)
    return out


def _step_folder(plan: FusePlan, kind: str, label: str, identity: Any) -> tuple[Path, str]:
    key = content_digest({"format": FORMAT_VERSION, "kind": kind, "identity": identity})[:12]
    return plan.work / kind / f"{label}-{key}", key


def _record_step(plan: FusePlan, progress: bool, processes: Processes) -> list[DistributionStore]:
    stores = []
    models = [plan.pivot, *plan.sources]
    for n, (model, label) in enumerate(zip(models, plan.labels), 1):
        identity = {"model": model_identity(model), "corpus": corpus_hash(plan.texts), **asdict(plan.store)}
        folder, _ = _step_folder(plan, "stores", label, identity)
        if not processes.main:
            stores.append(processes.wait_for(lambda: _complete(folder, "distribution store"), plan.work))
            continue
        existing = _complete(folder, "distribution store")
        state = "cached" if existing else "running"
        _say(f"fuse [1/4] record distributions {n}/{len(models)}: {label} ({state})", progress)
        store = existing or record_distributions(model, plan.texts, folder, settings=plan.store,
                                                 batch_size=plan.batch_size, device=plan.device, progress=progress,
                                                 label=label)
        _say(f"           {store.tokens} tokens, {store.bytes_per_token:.1f} bytes/token", progress)
        stores.append(store)
    return stores


def _complete(folder: Path, kind: str):
    if not (folder / MANIFEST_FILE).is_file():
        return None
    try:
        reader = DistributionStore(folder) if kind == "distribution store" else ShardedReader(folder, kind)
    except MergeplugError:
        return None
    intact = all((folder / r["file"]).is_file() and (folder / r["file"]).stat().st_size == r["bytes"]
                 for r in reader.manifest["shards"].values())
    return reader if intact else None


def _align_step(plan: FusePlan, stores: list[DistributionStore], progress: bool,
                processes: Processes) -> list[ShardedReader]:
    from transformers import AutoTokenizer

    data = plan.recipe.data
    aligner_use = data["aligner"]
    pivot_tokenizer = AutoTokenizer.from_pretrained(str(plan.pivot)) if processes.main else None
    targets = []
    for n, (source, store, label) in enumerate(zip(plan.sources, stores[1:], plan.labels[1:]), 1):
        identity = {"pivot": stores[0].identity, "source": store.identity, "aligner": aligner_use,
                    **asdict(plan.fusion)}
        folder, _ = _step_folder(plan, "targets", label, identity)
        if not processes.main:
            targets.append(processes.wait_for(lambda: _complete(folder, "fused targets"), plan.work))
            continue
        existing = _complete(folder, "fused targets")
        _say(f"fuse [2/4] align {n}/{len(plan.sources)}: {label} -> pivot with aligner {aligner_use['name']} "
             f"({'cached' if existing else 'running'})", progress)
        if existing is None:
            source_tokenizer = AutoTokenizer.from_pretrained(str(source))
            pairs = corpus_pairs(stores[0], store, pivot_tokenizer, source_tokenizer, plan.texts)
            aligner = fit_aligner(aligner_use["name"], aligner_use["parameters"], source_tokenizer, pivot_tokenizer,
                                  pairs)
            existing = build_targets(stores[0], store, aligner, pivot_tokenizer, source_tokenizer, plan.texts,
                                     folder, settings=plan.fusion, progress=progress, label=label,
                                     identity={"format": FORMAT_VERSION, **identity})
        m = existing.manifest
        positions = max(m["positions"], 1)
        _say(f"           positions: {m['paired'] / positions:.1%} paired, {m['one_to_many'] / positions:.1%} "
             f"one-to-many, {m['unpaired'] / positions:.1%} unpaired; the source's share of the targets: "
             f"{m['source_chosen'] / max(m['sequences'], 1):.1%} of sequences ({plan.fusion.function})", progress)
        targets.append(existing)
    return targets


def _finetune_step(plan: FusePlan, pivot_store: DistributionStore, targets: list[ShardedReader],
                   progress: bool, processes: Processes) -> list[Path]:
    from .finetuning import SUMMARY_FILE, finetune_examples

    use = plan.recipe.data["finetuner"]
    models = []
    for n, (target, label) in enumerate(zip(targets, plan.labels[1:]), 1):
        identity = {"pivot": model_identity(plan.pivot), "targets": target.identity, "finetuner": use}
        folder, key = _step_folder(plan, "models", label, identity)
        model = folder / "model"
        done = (model / SUMMARY_FILE).is_file() and (model / "config.json").is_file()
        _say(f"fuse [3/4] finetune {n}/{len(plan.sources)}: pivot against {label} with {use['name']} "
             f"({'cached' if done else 'running'})", progress)
        if not done:
            folder.mkdir(parents=True, exist_ok=True)
            examples = fusion_examples(pivot_store, target)
            # Every process trains (data parallel under a launcher); the process group is kept for the next
            # source, since accelerate sets it up once per process, and fuse ends it after the last.
            finetune_examples(str(plan.pivot), examples, model, finetuner=use["name"], parameters=use["parameters"],
                              origin={"targets": content_digest(target.identity)}, force=model.exists(),
                              device=plan.device, progress=progress, offline=True,
                              end_distributed=not processes.several)
        models.append(model)
    return models


def _merge_step(plan: FusePlan, models: list[Path], targets: list[ShardedReader], out: Path,
                progress: bool) -> Path:
    from .engine import merge, resolve_device
    from .recipe import check_recipe

    data = plan.recipe.data
    use = data["merger"]
    _say(f"fuse [4/4] merge {len(models)} target model(s) with {use['name']} (base: the pivot)", progress)
    merge_data = {"kind": "merge", "name": data.get("name") or f"fused {plan.pivot.name}", "method": use["name"],
                  "base_model": str(plan.pivot), "models": [{"model": str(m)} for m in models],
                  "parameters": use["parameters"]}
    if "dtype" in data:
        merge_data["dtype"] = data["dtype"]
    merge_recipe = check_recipe(merge_data, source=f"{plan.recipe.source} (merge step)", kind="merge")
    staged = out.parent / f".{out.name}.fuse-staged-{os.getpid()}"
    if staged.exists():
        shutil.rmtree(staged)
    try:
        merge(merge_recipe, staged, force=True, device=resolve_device(plan.device), progress=progress)
        (staged / "README.md").write_text(model_card(plan, models, targets, merge_data), encoding="utf-8")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def model_card(plan: FusePlan, models: Sequence[Path], targets: Sequence[ShardedReader], merge_data: dict) -> str:
    """A Hugging Face model card for the fused model: front matter, the method, per-source alignment figures
    and the recipe."""
    import yaml

    from .checkpoint import is_hub_id

    data = plan.recipe.data
    refs = [data["pivot"], *data["sources"]]
    hub_ids = [r for r in refs if is_hub_id(r) and not Path(r).exists()]
    front: dict[str, Any] = {}
    if hub_ids:
        front["base_model"] = list(dict.fromkeys(hub_ids))
        front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = ["mergeplug", "knowledge-fusion", "fusechat", "merge"]
    front["mergeplug"] = {"method": "fuse", "pivot": data["pivot"], "sources": list(data["sources"]),
                          "aligner": data["aligner"]["name"], "finetuner": data["finetuner"]["name"],
                          "merger": data["merger"]["name"], "fusion": asdict(plan.fusion)}
    if plan.recipe.path is not None and plan.recipe.path.is_file():
        recipe_text = plan.recipe.path.read_text(encoding="utf-8")
    else:
        recipe_text = yaml.safe_dump(data, sort_keys=False)
    title = data.get("name") or "Fused model"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             "Knowledge fusion with [mergeplug](https://pypi.org/project/mergeplug/) after FuseChat "
             "(arXiv:2402.16107): the pivot was finetuned against each source's token distributions on the fusion "
             f"corpus ({len(plan.texts)} texts; fusion function {plan.fusion.function}, top-{plan.store.top_k}), "
             f"and the resulting models were merged with **{data['merger']['name']}** (base: the pivot).", "",
             f"- pivot: `{data['pivot']}`"]
    for ref, target in zip(data["sources"], targets):
        m = target.manifest
        positions = max(m["positions"], 1)
        lines.append(f"- source: `{ref}` (positions paired {m['paired'] / positions:.1%}, one-to-many "
                     f"{m['one_to_many'] / positions:.1%}, unpaired {m['unpaired'] / positions:.1%}; its share of "
                     f"the fused targets {m['source_chosen'] / max(m['sequences'], 1):.1%} of sequences)")
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", "", "## Merge step", "", "```yaml",
              yaml.safe_dump(merge_data, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
