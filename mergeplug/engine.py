"""The merge run: stream N checkpoints tensor by tensor through a merger into a new checkpoint.

``merge(recipe, out)`` does, in order, and stops at the first problem with one line naming the model and
tensor:

1. checks the recipe (schema, merger, parameters) before touching any model, and refuses an existing ``out``
   unless ``force``;
2. opens every checkpoint lazily (``config.json`` and safetensors headers only) and checks, before reading a
   single weight, that all share the reference's architecture (``model_type``, ``architectures``) and its
   tensor names and shapes; the reference is ``base_model``, or ``models[0]`` when there is none;
3. for a merger with a ``statistic`` (Fisher, ...): runs each model on its own data (see Statistics below);
4. for each merger pre-pass, streams every tensor through ``merger.observe``, then ``finish_observing``;
5. streams every tensor: reads it from each input, converts it to ``compute_dtype`` on the device, resolves
   the per-tensor parameters (:mod:`mergeplug.schedule`), calls ``merger.merge``, casts the result to the
   output dtype and appends it to the current shard (:class:`~mergeplug.checkpoint.ShardedWriter`); peak
   memory is a few tensors times the number of inputs, never a whole model;
6. writes ``config.json``, ``generation_config.json``, the tokenizer files of ``tokenizer_source`` and a
   model card into a temporary folder beside ``out`` and renames it into place. An existing ``out`` is
   replaced only then; an error or Ctrl-C leaves ``out`` as it was and removes the temporary folder.

Vocabulary policy (embedding and ``lm_head`` rows, identified by the model family): with ``vocab_policy:
extend`` (the default) the output has as many rows as the tokenizer source's; rows present in the reference
(up to that count) are merged, a model with fewer rows than the reference contributes the reference's rows
there (a zero task vector), and rows beyond the reference's come unchanged from the tokenizer source. With
``vocab_policy: error`` any difference in row count stops the merge. ``config.json``'s ``vocab_size``
follows the output's rows.

Tied embeddings: when the reference has no ``lm_head.weight`` (its config ties it to the embeddings) none is
written and a model's own ``lm_head`` is ignored, with a warning; when the reference has one, a model
without it (a tied model) contributes its embedding matrix, which is what its output layer computes with.

Embeddings policy: ``embeddings: merge`` (the default) merges embeddings and ``lm_head`` like any tensor;
``embeddings: base`` keeps them at the base model's values, as MergeBench does for every task-vector
method (arXiv:2505.10833; uiuctml/MergeBench), which also sidesteps vocabulary mismatches.

LoRA adapters: a model (or base_model) that is a peft adapter folder (``adapter_config.json``, no
``config.json``) is read over its base, the recipe's base_model or else the ``base_model_name_or_path`` its
config names, as W_base + scaling·B·A per targeted tensor (:class:`~mergeplug.checkpoint.LoraAdapter`): every
merger works unchanged and the adapter's task vector is its low-rank product.

Statistics: a merger whose ``statistic`` is set needs data from every model, its own: ``models[i].domain``
(the domain's validation set, else its first training set; ``models[i].data`` then replaces that set's hub
data with local files) or ``models[i].data`` alone (local files with the Alpaca keys ``instruction``,
``response``). Data is never paired with models by list position (MergeBench's RegMean and Fisher code pair
the i-th data set with the i-th model, which mismatches them when the lists differ in order; arXiv:2505.10833,
uiuctml/MergeBench). Missing data is reported at planning, before any weight is read. The first ``samples``
rows of a seed-42 shuffle (MergeBench's draw, :func:`mergeplug.data.shuffled_first`) are rendered with the domain's prompt format (Alpaca for local files, MergeBench's finetuning format),
tokenized with the model's own tokenizer (BOS, prompt, response, EOS; cut at ``max_length`` tokens) and passed
to ``merger.compute_statistic`` in right-padded batches of similar lengths (:func:`statistic_batches`, up to
``statistics_batch_tokens`` padded tokens each) on the model loaded in float32 on the merge device. The
result is cached on disk (:mod:`mergeplug.statistics`, folder ``$MERGEPLUG_CACHE``), keyed by the statistic,
the model's files, the token ids and the merger's ``statistic_parameters``: a second merge with the same
model, data and settings runs no forward pass, and a damaged entry is recomputed. While merging, each model's
statistic for a tensor is read beside its weight into ``TensorInputs.statistics``. A merger whose
``statistic_needs_base`` is set (trained Localize-and-Stitch masks) is also handed the base model's weights,
read lazily (``compute_statistic(..., base=...)``), and the base model's fingerprint joins the cache key.

Randomised mergers draw from ``TensorInputs.generator``, seeded from the recipe's ``seed`` and the tensor
name: the same recipe and seed give byte-identical files.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import umask
from .checkpoint import (
    Checkpoint, ShardedWriter, TensorInfo, copy_tokenizer_files, dtype_name, is_hub_id, open_checkpoint, parse_size,
    replace_folder, resolve_model, torch_dtype,
)
from .errors import MergeplugError
from .schedule import depth, resolve_parameters

_FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}


@dataclass
class MergeInput:
    """One input checkpoint of the merge and its unresolved per-model parameters."""

    label: str  # "base" or "models[i]"
    ref: str
    checkpoint: Checkpoint
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.label} ({self.ref})"


@dataclass
class TensorPlan:
    """What the engine does for one output tensor, decided before any weight is read."""

    name: str
    shape: tuple[int, ...]  # output shape
    dtype: str  # output dtype
    action: str  # "merge": through the merger; "base": the base's value; "copy": the reference's (non-float)
    sources: list[str | None]  # per input (base first, if any): the tensor name to read there
    layer: int | None = None
    t: float = 1.0
    merge_rows: int | None = None  # for vocabulary tensors: rows merged; rows beyond come from the tokenizer source

    @property
    def nbytes(self) -> int:
        return TensorInfo(self.name, self.shape, self.dtype, Path()).nbytes


@dataclass
class StatisticSource:
    """Where model i's statistic data comes from, decided at planning (no data read yet)."""

    where: str  # "models[i] (ref)"
    entry: dict  # a domain's validation or training entry, or the entry describing local files
    source: dict | None  # models[i].data: local files replacing the entry's hub data set
    render_as: Any  # the Domain (its prompt format), or a dict with name and prompt_format


#: How local files given as ``models[i].data`` without a domain are read: Alpaca keys, Alpaca prompts.
LOCAL_STATISTIC_COLUMNS = {"instruction": "instruction", "response": "response"}


#: Padded tokens per statistics batch (our choice): a few rows of MergeBench's lengths per forward pass, enough
#: to fill a CPU's or a small GPU's matrix units without holding many activations; ``--statistics-batch-tokens``.
STATISTICS_BATCH_TOKENS = 4096


@dataclass
class MergePlan:
    """Everything :func:`run_merge` needs: the merger, the opened inputs and one plan per output tensor."""

    recipe: Any
    merger_name: str
    merger: Any
    global_schema: dict
    model_schema: dict | None
    base: MergeInput | None
    models: list[MergeInput]
    reference: MergeInput
    tokenizer_source: MergeInput
    family: Any
    tensors: list[TensorPlan]
    config: dict
    device: str
    compute_dtype: str
    seed: int
    max_shard_bytes: int
    statistic_sources: list[StatisticSource] = field(default_factory=list)  # per model, when the merger has a statistic
    statistics: list[Any] = field(default_factory=list)  # per model: its StoredStatistic, once computed
    statistics_batch_tokens: int = STATISTICS_BATCH_TOKENS  # padded tokens per forward pass of the statistics pass

    @property
    def inputs(self) -> list[MergeInput]:
        return ([self.base] if self.base else []) + self.models


# --- entry points ------------------------------------------------------------------------------------------
def merge(recipe, out: str | Path, *, force: bool = False, device: str | None = "cpu", dtype: str | None = None,
          progress: bool | None = None, registry=None, statistics_batch_tokens: int | None = None) -> Path:
    """Run a merge recipe (a path, or a checked :class:`~mergeplug.recipe.Recipe`) into folder ``out``.
    ``statistics_batch_tokens``: padded tokens per forward pass when a merger computes statistics
    (default :data:`STATISTICS_BATCH_TOKENS`); it changes speed and memory, not the statistic."""
    from .recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, registry=registry, kind="merge")
    elif recipe.kind != "merge":
        raise MergeplugError(f"{recipe.source}: kind: this is a {recipe.kind} recipe, but a merge recipe was expected")
    out = Path(out)
    check_output(out, force)
    plan = plan_merge(recipe, device=device, dtype=dtype, registry=registry)
    if statistics_batch_tokens is not None:
        if statistics_batch_tokens < 1:
            raise MergeplugError(f"statistics_batch_tokens: {statistics_batch_tokens}; give a positive number of tokens")
        plan.statistics_batch_tokens = statistics_batch_tokens
    return run_merge(plan, out, force=force, progress=progress)


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise MergeplugError(f"{out}: already exists; pass --force to replace it (replaced only once the new merge is complete)")
    if out.exists() and not out.is_dir():
        raise MergeplugError(f"{out}: exists and is not a folder; remove it or choose another output")


def resolve_device(device: str | None) -> str:
    """``auto``/None -> cuda when available, else cpu; a clear error for cuda or mps without one."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MergeplugError(f"--device {device}: no CUDA GPU is available to torch; use --device cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise MergeplugError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise MergeplugError("--device mps: the MPS backend is not available; use --device cpu")
    elif device not in ("cpu", "mps"):
        raise MergeplugError(f"--device {device}: use cpu, cuda, cuda:N, mps or auto")
    return device


# --- planning ----------------------------------------------------------------------------------------------
def plan_merge(recipe, *, device: str | None = "cpu", dtype: str | None = None, registry=None) -> MergePlan:
    """Open the inputs lazily and check them against each other; reads headers and configs, no weights."""
    from .families import family_for

    data, source = recipe.data, recipe.source
    component = recipe.components["method"]
    merger_cls = component.load()
    merger = merger_cls(data["parameters"])  # a checked recipe already names a base_model when the merger needs one
    statistic_sources = _statistic_sources(component.name, merger, data, registry)
    device = resolve_device(device)
    embeddings = data.get("embeddings", "merge")
    if embeddings == "base" and "base_model" not in data:
        raise MergeplugError(f"{source}: embeddings: 'base' keeps the base model's embeddings and needs a base_model")

    relative_to = recipe.path.parent if recipe.path else None
    trust = bool(data.get("trust_remote_code", False))

    def open_input(label: str, ref: str, parameters: dict, base: MergeInput | None = None) -> MergeInput:
        folder = resolve_model(ref, label=label, trust_remote_code=trust, relative_to=relative_to)
        checkpoint = open_checkpoint(folder, label=label, ref=ref, base=base.checkpoint if base else None,
                                     trust_remote_code=trust)
        return MergeInput(label, ref, checkpoint, parameters)

    base = open_input("base", data["base_model"], {}) if "base_model" in data else None
    # A LoRA adapter among the models reads over the recipe's base (else over the base its config names).
    models = [open_input(f"models[{i}]", m["model"], m.get("parameters", {}), base) for i, m in enumerate(data["models"])]
    reference = base or models[0]
    inputs = ([base] if base else []) + models

    _check_architectures(reference, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        family = family_for(reference.checkpoint.config, registry, source=reference.where)
    tokenizer_source = _tokenizer_source(data.get("tokenizer_source", "base"), base, models, source)
    out_dtype = dtype_name(dtype or data.get("dtype") or _config_dtype(family, reference.checkpoint.config) or "") or None
    if out_dtype is not None:
        torch_dtype(out_dtype)  # a clear error for an unknown name
    tensors, vocab_rows = _plan_tensors(reference, inputs, tokenizer_source, family, out_dtype,
                                        data.get("vocab_policy", "extend"), embeddings)
    config = _output_config(reference.checkpoint.config, family, out_dtype, vocab_rows)
    return MergePlan(
        recipe=recipe, merger_name=component.name, merger=merger, global_schema=component.parameters,
        model_schema=component.model_parameters, base=base, models=models, reference=reference,
        tokenizer_source=tokenizer_source, family=family, tensors=tensors, config=config, device=device,
        compute_dtype=dtype_name(data.get("compute_dtype", "float32")), seed=int(data.get("seed", 0)),
        max_shard_bytes=parse_size(data.get("shard_size", "5GB")),
        statistic_sources=statistic_sources,
    )


def _statistic_sources(merger_name: str, merger, data: dict, registry) -> list[StatisticSource]:
    """Each model's own data for the merger's statistic (none when it needs none); an error for a model
    without any, before a checkpoint is opened."""
    if getattr(merger, "statistic", None) is None:
        return []
    from .plugins import get_registry

    sources = []
    for i, model in enumerate(data["models"]):
        where = f"models[{i}] ({model['model']})"
        domain_name, local = model.get("domain"), model.get("data")
        if domain_name is None and local is None:
            raise MergeplugError(f"{where}: merger {merger_name} needs data from each model: give `domain:` "
                                 f"(e.g. math) or `data:` in the recipe")
        if domain_name is None:
            entry = {"name": f"{where} data", "split": "train", "columns": dict(LOCAL_STATISTIC_COLUMNS)}
            sources.append(StatisticSource(where, entry, local, {"name": where, "prompt_format": "alpaca"}))
            continue
        domain = (registry or get_registry()).get("domain", domain_name).load()
        entry = domain.validation or (domain.training[0] if domain.training else None)
        if entry is None:
            raise MergeplugError(f"{where}: domain {domain_name} has neither a validation nor a training set for "
                                 f"merger {merger_name}; give local files with `data:`")
        sources.append(StatisticSource(where, {"name": f"{domain_name} (for {where})", **entry}, local, domain))
    return sources


def _check_architectures(reference: MergeInput, inputs: list[MergeInput]) -> None:
    ref_config = reference.checkpoint.config
    for inp in inputs:
        if inp is reference:
            continue
        config = inp.checkpoint.config
        for key in ("model_type", "architectures"):
            if key in ref_config and key in config and config[key] != ref_config[key]:
                raise MergeplugError(
                    f"{inp.where}: config.json {key} is {config[key]!r}, {reference.label} has {ref_config[key]!r}; "
                    f"models merged in parameter space must share one architecture"
                )


def _tokenizer_source(value: str, base: MergeInput | None, models: list[MergeInput], source: str) -> MergeInput:
    if value == "base":
        return base or models[0]
    candidates = ([base] if base else []) + models
    for inp in candidates:
        if value in (inp.ref, inp.label):
            return inp
    known = ", ".join(["base"] + [repr(i.ref) for i in candidates])
    raise MergeplugError(f"{source}: tokenizer_source: {value!r} is neither 'base' nor one of the recipe's models ({known})")


def _config_dtype(family, config: dict) -> str | None:
    text = family.text_config(config)
    for key in ("dtype", "torch_dtype"):
        for where in (config, text):
            value = where.get(key)
            if isinstance(value, str) and dtype_name(value) in _FLOAT_DTYPES:
                return value
    return None


def _plan_tensors(reference: MergeInput, inputs: list[MergeInput], tokenizer_source: MergeInput, family,
                  out_dtype: str | None, vocab_policy: str, embeddings: str) -> tuple[list[TensorPlan], int | None]:
    ref_tensors = reference.checkpoint.tensors
    is_vocab = lambda name: family.is_embedding(name) or family.is_lm_head(name)  # noqa: E731
    embedding_name = next((n for n in family.embedding_names if n in ref_tensors), None)
    sources: dict[str, list[str | None]] = {name: [] for name in ref_tensors}
    for inp in inputs:
        tensors = inp.checkpoint.tensors
        for name, info in ref_tensors.items():
            own = name
            if name not in tensors:
                tied = next((n for n in family.embedding_names if n in tensors), None)
                if family.is_lm_head(name) and tied is not None:
                    own = tied  # a tied model's output layer is its embedding matrix
                else:
                    raise MergeplugError(f"{inp.where}: has no tensor {name}, which {reference.label} has")
            theirs = tensors[own]
            if theirs.shape != info.shape:
                vocab_only = (is_vocab(name) and len(theirs.shape) == len(info.shape) and len(info.shape) >= 1
                              and theirs.shape[1:] == info.shape[1:])
                if not vocab_only:
                    raise MergeplugError(f"{inp.where}: tensor {name} has shape {list(theirs.shape)}, "
                                         f"{reference.label} has {list(info.shape)}")
                if vocab_policy == "error":
                    raise MergeplugError(
                        f"{inp.where}: tensor {name} has {theirs.shape[0]} rows, {reference.label} has {info.shape[0]}; "
                        f"vocab_policy is error (use vocab_policy: extend to merge the shared rows)"
                    )
            sources[name].append(own)
        for name in tensors:
            if name in ref_tensors:
                continue
            if family.is_lm_head(name) and embedding_name is not None:
                warnings.warn(f"{inp.where}: has its own {name}, but {reference.label} ties it to {embedding_name}; "
                              f"the merged model is tied like {reference.label}, so {name} is ignored", stacklevel=4)
                continue
            raise MergeplugError(f"{inp.where}: tensor {name} is not in {reference.label}")

    num_layers = family.num_layers(reference.checkpoint.config)
    tok_index = inputs.index(tokenizer_source)
    plans, vocab_rows = [], None
    for name in reference.checkpoint.read_order():
        info = ref_tensors[name]
        floating = info.dtype in _FLOAT_DTYPES
        shape, merge_rows = info.shape, None
        if is_vocab(name):
            out_rows = tokenizer_source.checkpoint.tensors[sources[name][tok_index]].shape[0]
            merge_rows = min(out_rows, info.shape[0])
            shape = (out_rows, *info.shape[1:])
            vocab_rows = out_rows
        action = "merge" if floating else "copy"
        if floating and embeddings == "base" and is_vocab(name):
            action = "base"
        layer = family.layer_index(name)
        plans.append(TensorPlan(
            name=name, shape=shape, dtype=(out_dtype if floating and out_dtype else info.dtype), action=action,
            sources=sources[name], layer=layer, t=depth(layer, num_layers, before_blocks=family.is_embedding(name)),
            merge_rows=merge_rows,
        ))
    return plans, vocab_rows


def _output_config(config: dict, family, out_dtype: str | None, vocab_rows: int | None) -> dict:
    config = copy.deepcopy(config)
    text = family.text_config(config)
    if out_dtype is not None:
        for where in {id(config): config, id(text): text}.values():
            if "torch_dtype" in where:
                where["torch_dtype"] = out_dtype
            if "dtype" in where or where is config:
                where["dtype"] = out_dtype
    if vocab_rows is not None and text.get("vocab_size") not in (None, vocab_rows):
        text["vocab_size"] = vocab_rows
    return config


# --- running -----------------------------------------------------------------------------------------------
def run_merge(plan: MergePlan, out: str | Path, *, force: bool = False, progress: bool | None = None) -> Path:
    """Stream the merge into a temporary folder beside ``out`` and rename it into place."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    from . import native

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the model folder should not be
    try:
        if plan.statistic_sources and not plan.statistics:
            plan.statistics = compute_statistics(plan)
        with _reusing_freed_memory(), native.lending_threads():
            _stream(plan, tmp, progress)
        _write_metadata(plan, tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _stream(plan: MergePlan, tmp: Path, progress: bool | None) -> None:
    """Every output tensor, merged and written into ``tmp`` in order (pre-passes first)."""
    writer = None
    try:
        writer = ShardedWriter(tmp, [(t.name, t.shape, t.dtype) for t in plan.tensors], plan.max_shard_bytes,
                               metadata={"merged_by": "mergeplug", "merge_method": plan.merger_name})
        by_name = {t.name: t for t in plan.tensors}
        for pass_index in range(int(getattr(plan.merger, "prepasses", 0) or 0)):
            with _bar(plan, f"observe {pass_index + 1}", progress) as bar:
                for tensor in plan.tensors:
                    if tensor.action == "merge":
                        plan.merger.observe(_inputs(plan, tensor), pass_index)
                    bar.update(tensor.nbytes)
            plan.merger.finish_observing(pass_index)
        with _bar(plan, "merge", progress) as bar:
            for name in writer.order:
                tensor = by_name[name]
                writer.write(name, _output_tensor(plan, tensor))
                bar.update(tensor.nbytes)
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


#: glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, and their defaults.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD = -1, -3, 128 * 1024


@contextlib.contextmanager
def _reusing_freed_memory():
    """While merging, keep freed tensor memory in the process for the next tensor (glibc on Linux).

    glibc serves every allocation above 128 KiB with a fresh mmap and unmaps it when freed, so each merged
    tensor's buffers were page-faulted in anew (zero-filled by the kernel) and a linear merge spent more time in
    page faults than in arithmetic. Raising the mmap and trim thresholds to 1 GiB lets freed buffers be reused
    (measured on a 10-block Llama, bf16, 4 inputs: linear 1.30 s -> 0.71 s, TIES 3.5 s -> 3.0 s; the resident
    peak grows by about 150 MiB, the size of the largest tensor's buffers). The thresholds go back to glibc's
    default values afterwards (fixed from then on: glibc has no way to restore its sliding mmap threshold) and
    malloc_trim returns what is kept, so a process that merges and goes on (a notebook, the bench) does not
    hold it. Elsewhere (macOS, musl, Windows) nothing changes."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            if not (libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)):
                libc = None
        except (OSError, AttributeError):  # not glibc
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            libc.malloc_trim(0)


def _bar(plan: MergePlan, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    total = sum(t.nbytes for t in plan.tensors)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, leave=False)


def _inputs(plan: MergePlan, tensor: TensorPlan):
    from .merging import TensorInputs

    inputs = plan.inputs
    offset = 1 if plan.base else 0
    rows = tensor.merge_rows
    convert = not getattr(plan.merger, "stored_dtype_inputs", False)
    loaded = [_read_source(plan, inp, tensor, i, rows, convert) for i, inp in enumerate(inputs)]
    return TensorInputs(
        name=tensor.name,
        base=loaded[0] if plan.base else None,
        models=loaded[offset:],
        parameters=resolve_parameters(plan.merger.parameters, plan.global_schema, tensor.name, tensor.t),
        model_parameters=[resolve_parameters(m.parameters, plan.model_schema, tensor.name, tensor.t) for m in plan.models],
        layer=tensor.layer,
        num_layers=plan.family.num_layers(plan.reference.checkpoint.config),
        seed=plan.seed,
        model_names=[m.ref for m in plan.models],
        statistics=[_read_statistic(plan, i, tensor) for i in range(len(plan.models))] if plan.statistics else [],
        compute_dtype=torch_dtype(plan.compute_dtype),
    )


def _read_statistic(plan: MergePlan, model_index: int, tensor: TensorPlan):
    """Model i's statistic for ``tensor``, rows aligned like its weight (a model with fewer vocabulary rows
    has none for the reference's extra rows: zeros), or None when it has none for this tensor."""
    import torch

    stored = plan.statistics[model_index]
    name = tensor.sources[model_index + (1 if plan.base else 0)]
    if name not in stored.record["names"]:
        return None
    data = stored.get(name)
    if getattr(plan.merger, "statistic_shape", "weight") == "any":  # shaped its own way: the merger checks it
        return data.to(plan.device).to(torch_dtype(plan.compute_dtype))
    model = plan.models[model_index]
    expected = model.checkpoint.tensors[name].shape
    if tuple(data.shape) != tuple(expected):
        raise MergeplugError(f"{model.where}: statistic {plan.merger.statistic} for {name} has shape "
                             f"{list(data.shape)}, the weight {list(expected)}; delete cache entry {stored.folder}")
    rows = tensor.merge_rows
    if rows is not None and data.shape[0] != rows:
        data = data[:rows] if data.shape[0] > rows else torch.cat([data, data.new_zeros((rows - data.shape[0], *data.shape[1:]))])
    return data.to(plan.device).to(torch_dtype(plan.compute_dtype))


def compute_statistics(plan: MergePlan) -> list:
    """Each model's statistic (a :class:`~mergeplug.statistics.StoredStatistic`), from the cache or computed
    now on the model's own data (see the module docstring)."""
    from transformers import AutoTokenizer

    from .checkpoint import LoraAdapter
    from .data import load_rows, render_training_example, shuffled_first
    from .statistics import StatisticsCache, data_fingerprint, model_fingerprint

    merger = plan.merger
    settings = {name: merger.parameters.get(name) for name in merger.statistic_parameters}
    samples, max_length = settings.get("samples"), settings.get("max_length")
    cache = StatisticsCache()
    trust = bool(plan.recipe.data.get("trust_remote_code", False))
    needs_base = bool(getattr(merger, "statistic_needs_base", False))
    if needs_base and plan.base is None:
        raise MergeplugError(f"{plan.recipe.source}: merger {plan.merger_name} computes its {merger.statistic} "
                             f"statistic against a base model; give base_model in the recipe")
    base_fingerprint = _checkpoint_fingerprint(plan.base.checkpoint) if needs_base else None
    stored = []
    for model_input, source in zip(plan.models, plan.statistic_sources):
        checkpoint = model_input.checkpoint
        if isinstance(checkpoint, LoraAdapter):
            raise MergeplugError(f"{source.where}: merger {plan.merger_name} computes statistics on full models; "
                                 f"merge the LoRA adapter into its base first (peft's merge_and_unload)")
        # Every row, then the first `samples` of a seed-42 shuffle, as MergeBench draws them: the sample spreads
        # over the whole set rather than its head.
        rows = shuffled_first(load_rows(source.entry, source=source.source, label=source.entry["name"]).rows, samples)
        if not rows:
            raise MergeplugError(f"{source.where}: its data for merger {plan.merger_name} has no rows")
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.tokenizer_folder), trust_remote_code=trust)
        examples = [_tokenize_example(tokenizer, *render_training_example(source.render_as, row), max_length)
                    for row in rows]
        fingerprint = model_fingerprint(str(checkpoint.folder))
        if needs_base:  # only then: the keys of statistics that read no base stay as they were
            fingerprint = {**fingerprint, "base": base_fingerprint}
        key = cache.key(statistic=merger.statistic, model=fingerprint, data=data_fingerprint(examples),
                        settings=settings)

        def compute(folder=checkpoint.folder, examples=examples, where=source.where):
            return _run_statistic(plan, folder, examples, settings, where, trust)

        meta = {"statistic": merger.statistic, "model": model_input.ref, "rows": len(rows), **settings}
        if needs_base:
            meta["base"] = plan.base.ref
        entry, _ = cache.get_or_compute(key, compute, meta=meta)
        if not set(entry.record["names"]) & set(checkpoint.tensors):
            # Parameter names the checkpoint does not use (a renaming in transformers): merging would silently
            # ignore the statistic, so say so instead.
            raise MergeplugError(f"{source.where}: its {merger.statistic} statistic names no tensor of the checkpoint "
                                 f"(e.g. {entry.record['names'][:2]}); cache entry {entry.folder}")
        stored.append(entry)
    return stored


def _tokenize_example(tokenizer, prompt: str, response: str, max_length: int | None) -> dict:
    """Token ids of BOS + prompt + response + EOS cut at ``max_length``, and how many are the prompt's."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]  # the specialists were trained to stop
    ids = (prompt_ids + response_ids)[:max_length] if max_length else prompt_ids + response_ids
    return {"input_ids": ids, "prompt_tokens": min(len(prompt_ids), len(ids))}


def statistic_batches(examples: list[dict], device: str, batch_tokens: int = STATISTICS_BATCH_TOKENS,
                      pad_id: int = 0) -> list[dict]:
    """The statistics pass's batches: examples sorted longest first (so rows of a batch have similar lengths and
    little padding) and grouped while rows × the longest length stays within ``batch_tokens`` (one row at
    least). Each batch holds ``input_ids``, ``labels`` (-100 on the prompt and on padding) and
    ``attention_mask`` (0 on padding), shape [rows, length], padded on the right."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * len(examples[groups[-1][0]]["input_ids"]) <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    batches = []
    for group in groups:
        width = len(examples[group[0]]["input_ids"])
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            tokens = examples[i]["input_ids"]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            labels[row, examples[i]["prompt_tokens"]:len(tokens)] = ids[row, examples[i]["prompt_tokens"]:len(tokens)]
            mask[row, :len(tokens)] = 1
        batches.append({"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)})
    return batches


def _run_statistic(plan: MergePlan, folder: Path, examples: list[dict], settings: dict, where: str, trust: bool):
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=trust)
    model.to(plan.device).eval()
    batches = statistic_batches(examples, plan.device, plan.statistics_batch_tokens)
    extra = {}
    if getattr(plan.merger, "statistic_needs_base", False):
        extra["base"] = BaseWeights(plan.base, [name for name, _ in model.named_parameters()], plan.device)
    try:
        with torch.enable_grad():
            result = plan.merger.compute_statistic(model, batches, dict(settings), **extra)
        return {name: t.detach().cpu() for name, t in result.items()}
    except MergeplugError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported with the model it failed on
        raise MergeplugError(f"{where}: merger {plan.merger_name!r} failed computing its statistic "
                             f"{plan.merger.statistic}: {type(exc).__name__}: {exc}") from exc
    finally:
        del model, batches
        gc.collect()
        if plan.device.startswith("cuda"):
            torch.cuda.empty_cache()


class BaseWeights(Mapping):
    """The base model's weights for a statistic that needs them (``Merger.statistic_needs_base``): parameter
    name -> float32 tensor on ``device``, read from the base checkpoint on each lookup, so the statistics pass
    holds none of them unless the merger keeps them. The names are those of ``parameter_names`` (the model's
    ``named_parameters()``) that the base checkpoint has."""

    def __init__(self, base: MergeInput, parameter_names: list[str], device: str):
        self._base, self._device = base, device
        available = base.checkpoint.tensors
        self._names = dict.fromkeys(name for name in parameter_names if name in available)  # ordered, O(1) lookup

    def __getitem__(self, name: str):
        import torch

        if name not in self._names:
            raise KeyError(name)
        return self._base.checkpoint.get(name).to(device=self._device, dtype=torch.float32)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    @property
    def where(self) -> str:
        return self._base.where


def _checkpoint_fingerprint(checkpoint) -> dict:
    """:func:`~mergeplug.statistics.model_fingerprint` of a checkpoint; a LoRA adapter's includes its base's."""
    from .checkpoint import LoraAdapter
    from .statistics import model_fingerprint

    fingerprint = model_fingerprint(str(checkpoint.folder))
    if isinstance(checkpoint, LoraAdapter):
        fingerprint = {**fingerprint, "adapter_base": _checkpoint_fingerprint(checkpoint.base)}
    return fingerprint


def _read_source(plan: MergePlan, inp: MergeInput, tensor: TensorPlan, index: int, rows: int | None,
                 convert: bool = True):
    """One input's tensor on the merge device, rows aligned to the reference's; in the compute dtype unless
    ``convert`` is off (a merger with ``stored_dtype_inputs``)."""
    import torch

    data = inp.checkpoint.get(tensor.sources[index])
    if rows is not None and data.shape[0] != rows:
        if data.shape[0] > rows:
            data = data[:rows]
        else:  # fewer rows than the reference: the reference's own rows stand in (a zero task vector)
            ref_index = plan.inputs.index(plan.reference)
            ref = plan.reference.checkpoint.get(tensor.sources[ref_index])
            data = torch.cat([data, ref[data.shape[0]:rows].to(data.dtype)])
    data = data.to(plan.device)
    return data.to(torch_dtype(plan.compute_dtype)) if convert else data


def _output_tensor(plan: MergePlan, tensor: TensorPlan):
    import torch

    out_dtype = torch_dtype(tensor.dtype)
    ref_index = plan.inputs.index(plan.reference)
    if tensor.action == "copy":
        return plan.reference.checkpoint.get(tensor.sources[ref_index])
    if tensor.action == "base":
        merged = _read_source(plan, plan.base, tensor, 0, tensor.merge_rows)
    else:
        inputs = _inputs(plan, tensor)
        try:
            merged = plan.merger.merge(inputs)
        except MergeplugError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin's bug, reported with the tensor it failed on
            raise MergeplugError(f"merger {plan.merger_name!r} failed on tensor {tensor.name}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        expected = tuple(inputs.models[0].shape)
        if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != expected:
            got = list(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
            raise MergeplugError(f"merger {plan.merger_name!r} returned {got} for tensor {tensor.name}, "
                                 f"expected shape {list(expected)}")
        del inputs
    if tensor.merge_rows is not None and tensor.shape[0] > tensor.merge_rows:
        tok_index = plan.inputs.index(plan.tokenizer_source)
        extra = plan.tokenizer_source.checkpoint.get(tensor.sources[tok_index])[tensor.merge_rows:tensor.shape[0]]
        merged = torch.cat([merged, extra.to(merged.device).to(merged.dtype)])
    return merged.to(out_dtype).cpu()


# --- metadata ----------------------------------------------------------------------------------------------
def _write_metadata(plan: MergePlan, folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    ref_folder = plan.reference.checkpoint.config_folder  # a LoRA adapter's config is its base's
    if (ref_folder / "generation_config.json").is_file():
        shutil.copy2(ref_folder / "generation_config.json", folder / "generation_config.json")
    copied = copy_tokenizer_files(plan.tokenizer_source.checkpoint.tokenizer_folder, folder)
    if not copied:
        warnings.warn(f"{plan.tokenizer_source.where}: has no tokenizer files; the merged model has no tokenizer",
                      stacklevel=3)
    if plan.config.get("auto_map"):
        if plan.recipe.data.get("trust_remote_code"):
            for path in sorted(ref_folder.glob("*.py")):
                shutil.copy2(path, folder / path.name)
        else:
            warnings.warn(f"{plan.reference.where}: config.json names custom code (auto_map); its .py files were "
                          f"not copied (set trust_remote_code: true in the recipe to copy them)", stacklevel=3)
    (folder / "README.md").write_text(model_card(plan), encoding="utf-8")


def model_card(plan: MergePlan) -> str:
    """A Hugging Face model card: YAML front matter (base_model, tags...) and the recipe in a yaml block."""
    import yaml

    recipe = plan.recipe
    hub_ids = [i.ref for i in plan.inputs if is_hub_id(i.ref) and not Path(i.ref).exists()]
    front: dict[str, Any] = {}
    if hub_ids:  # the hub accepts only hub ids here; local folders are listed in the text below
        front["base_model"] = list(dict.fromkeys(hub_ids))
        front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = ["merge", "mergeplug"]
    component = recipe.components["method"]
    # Every input, local folder or hub id, under our own key: the hub's base_model takes hub ids only.
    front["mergeplug"] = {"method": component.name, **({"base_model": plan.base.ref} if plan.base else {}),
                          "models": [m.ref for m in plan.models]}
    if recipe.path is not None and recipe.path.is_file():
        recipe_text = recipe.path.read_text(encoding="utf-8")
    else:
        recipe_text = yaml.safe_dump(recipe.data, sort_keys=False)
    title = recipe.data.get("name") or "Merged model"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
        f"Merged with [mergeplug](https://pypi.org/project/mergeplug/) using **{component.name}**"
        + (f" ({component.reference})" if component.reference else "") + ".", "",
    ]
    if plan.base:
        lines.append(f"- base model: `{plan.base.ref}`")
    lines += [f"- {m.label}: `{m.ref}`" for m in plan.models]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)
