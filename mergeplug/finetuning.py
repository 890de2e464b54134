"""The finetuner contract, and the supervised finetuning run every finetuner plugin shares.

A finetuner plugin (kind ``finetuner``) registers a subclass of :class:`Finetuner`. The core owns the run:
it loads the base model and tokenizer, builds the training set from the domains' training data (the domain's
prompt format, loss on response tokens only, optional packing), trains with transformers' Trainer (accelerate
underneath, so the same command runs under ``accelerate launch`` or ``torchrun``), logs the loss, resumes from
the last checkpoint, and writes the output folder atomically. The plugin decides only what is trained and
how the result is saved: ``full`` trains every weight; ``lora`` wraps the model with peft adapters and saves
the adapter beside the merged full weights.

A finetuner that trains towards more than the gold tokens (``fusion``: distillation towards per-token target
distributions) declares the per-token fields its examples carry (:attr:`Finetuner.EXTRA_FIELDS`) and computes
the loss itself (:meth:`Finetuner.compute_loss`); its examples come ready-made (:func:`finetune_examples`),
and packing, padding, distribution and resumption are the same run's.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from .checkpoint import replace_folder
from .errors import MergeplugError


class Finetuner:
    """Base class of finetuner plugins.

    Constructed with the finetuner's parameters (its ``parameters.json``, defaults filled in): the training
    hyper-parameters the core reads (:attr:`TRAINING_PARAMETERS`) and the plugin's own.
    """

    #: Parameters the core's training run reads (learning_rate, epochs...); the rest are the plugin's own.
    TRAINING_PARAMETERS: ClassVar[tuple[str, ...]] = (
        "learning_rate", "epochs", "max_steps", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm",
        "per_device_batch_size", "gradient_accumulation_steps", "max_seq_length", "packing",
        "gradient_checkpointing", "bf16", "save_steps", "logging_steps", "seed",
    )

    #: Per-token fields a training example carries besides input_ids and labels, with their padding value
    #: (name -> int or float): none for supervised finetuning; a distillation target for ``fusion``. The row at
    #: position j of a field belongs to the token at j, as its label does (the model's logits at j - 1 predict
    #: it). Packing concatenates the fields and the collator pads them with that value (an int: int64 tensors;
    #: a float: float32). A finetuner that declares any trains on ready-made examples (:func:`finetune_examples`),
    #: never on a domain's rows, which cannot carry them.
    EXTRA_FIELDS: ClassVar[dict[str, int | float]] = {}

    def __init__(self, **parameters: Any):
        self.parameters = parameters

    def compute_loss(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
        """The training loss of one collated batch, or None for the model's own (cross-entropy on the labels).

        ``inputs`` holds ``input_ids``, ``labels``, ``position_ids`` and the :attr:`EXTRA_FIELDS` tensors: pop
        the extra fields before calling ``model(**inputs)``. ``num_items_in_batch`` is the Trainer's count of
        label tokens (labels past each row's first that are not IGNORE_INDEX) over the whole accumulated batch
        and every process: when it is given, return this batch's sum divided by it (the run then adds the
        micro-batches as they are, as transformers' own causal-LM loss does); when None, this batch's mean.
        """
        return None

    def prepare_model(self, model: Any) -> Any:
        """The model to train (called once the base is loaded): ``model`` itself, or a wrapper (peft)."""
        return model

    def save(self, model: Any, tokenizer: Any, folder: Path, *, base: str) -> None:
        """Write the trained model into ``folder`` (a staging folder the core renames into place): a complete
        Hugging Face checkpoint (config, weights, tokenizer) that ``AutoModelForCausalLM`` loads, in the dtype
        the base is stored in (:func:`save_in_base_dtype`), so a specialist's task vector is taken between
        tensors of one dtype. Override it for models that are not saved whole (an adapter to fold in first)."""
        save_in_base_dtype(model, tokenizer, folder, base=base)


# === the run ===============================================================================================
# The training parameters' schema, defaults and sources live in schemas/finetune.schema.json
# ($defs.trainingParameters): MergeBench's one published recipe (arXiv:2505.10833, its
# scripts/llama-3.1-8b_code.yaml for axolotl) where it gives one, our choices marked as such.
def training_schema() -> dict:
    """The JSON Schema of the training parameters every finetuner accepts."""
    from .schema import load_schema

    return load_schema("finetune")["$defs"]["trainingParameters"]


def training_defaults() -> dict[str, Any]:
    from .schema import defaults

    return defaults(training_schema())


def parameter_schema(component: Any) -> dict:
    """A finetuner's full parameter schema: the training parameters, then its own (which win on a shared name,
    so a plugin may change a training default, as lora does for the learning rate)."""
    own = component.parameters
    return {**own, "type": "object", "additionalProperties": False,
            "properties": {**training_schema()["properties"], **own.get("properties", {})}}


#: Parameters that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("max_steps", "save_steps", "logging_steps")
#: Checkpoints kept in the staging folder: the newest, and the one before in case the newest is cut short.
SAVE_TOTAL_LIMIT = 2
IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and transformers' loss) skips
LOG_FILE, RUN_FILE, SUMMARY_FILE, PLOT_FILE = "training_log.jsonl", "run.json", "mergeplug_finetune.json", "loss.png"


def finetune(base: str, domains: str | Sequence[str], output: str | Path, *, finetuner: str = "full",
             parameters: dict | None = None, data: dict | None = None, force: bool = False, resume: bool = True,
             limit: int | None = None, device: str = "auto", progress: bool = True, offline: bool | None = None,
             callbacks: Sequence[Any] = ()) -> Path:
    """Finetune ``base`` on the training sets of ``domains`` (a name, a list, a comma-separated string or
    ``all``: several domains train one model on their mixture, MergeBench's multi-task baseline) into ``output``.

    Everything that can be checked is checked before any model loads: the domains, the finetuner and its
    ``parameters`` (defaults filled in), the base model, the output folder (an existing one needs ``force``,
    and is replaced only once the new model is complete) and every training row. ``data`` maps ``DOMAIN`` (a
    domain with one training set) or ``DOMAIN.N`` (its N-th) to local data, a path or a ``dataSource`` dict.
    ``limit`` keeps the first N rows of each training set. Training runs in ``.OUTPUT.partial/`` beside the
    output; a rerun of the same command resumes from its last checkpoint (``resume=False`` starts over).
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects. Under ``torchrun`` or ``accelerate
    launch`` every process calls this; only the main one writes the output.
    """
    out = Path(output).expanduser().absolute()
    resolved = resolve_training_domains(domains)
    cls, params = _finetuner_and_parameters(finetuner, parameters)
    if cls.EXTRA_FIELDS:
        raise MergeplugError(f"finetuner {finetuner}: trains on per-token targets ({', '.join(cls.EXTRA_FIELDS)}) "
                             "that a domain's rows do not carry; run it through the command that builds them "
                             "(`mergeplug fuse` for fusion)")
    check_base_model(base, offline)
    check_output(out, force)
    check_device(device)
    sets = load_training_sets(resolved, data or {}, limit=limit, offline=offline)
    run = {"base": base, "domains": [d.name for d in resolved], "finetuner": finetuner, "limit": limit,
           "parameters": {k: v for k, v in params.items() if k not in RESUMABLE_CHANGES},
           "data": {s.label: s.origin for s in sets}}

    def build(tokenizer: Any, max_seq_length: int) -> list[dict]:
        return tokenize_examples(mixture(sets, params["seed"]), tokenizer, max_seq_length)

    return _train(run, cls(**params), params, build, out, force=force, resume=resume, device=device,
                  progress=progress, callbacks=callbacks, local_files_only=bool(offline))


def finetune_examples(base: str, examples: Sequence[dict], output: str | Path, *, finetuner: str = "full",
                      parameters: dict | None = None, origin: Any = None, force: bool = False, resume: bool = True,
                      device: str = "auto", progress: bool = True, offline: bool | None = None,
                      callbacks: Sequence[Any] = (), end_distributed: bool = True) -> Path:
    """Finetune ``base`` on ready-made examples into ``output``: the same run as :func:`finetune` (checks,
    packing, Trainer, resumption, atomic output), with the training set given instead of built from domains.

    Each example is ``{input_ids, labels}`` tokenised with the base's tokenizer (labels IGNORE_INDEX where no
    loss is taken), plus every field the finetuner declares in :attr:`Finetuner.EXTRA_FIELDS`, each with one
    row per token (lists or numpy arrays). Examples longer than ``max_seq_length`` are cut, their fields
    with them. ``origin`` (JSON-able) says what the examples are, e.g. the content hash of the store they
    were built from: it is recorded with the run, so a rerun on other examples does not resume this one.

    Under ``torchrun`` or ``accelerate launch`` the run ends by taking the process group down
    (``end_distributed``); a caller that trains several models in one launch (``mergeplug fuse``, one per
    source) passes False, since accelerate's process state is set up once per process and would not bring the
    group back, and ends it itself once (:func:`end_distributed_run`). The other processes then return as soon
    as their share of the training is done, while the main one writes the output.
    """
    out = Path(output).expanduser().absolute()
    cls, params = _finetuner_and_parameters(finetuner, parameters)
    check_examples(examples, cls.EXTRA_FIELDS, finetuner)
    check_base_model(base, offline)
    check_output(out, force)
    check_device(device)
    run = {"base": base, "examples": len(examples), "finetuner": finetuner, "data": origin,
           "parameters": {k: v for k, v in params.items() if k not in RESUMABLE_CHANGES}}

    def build(tokenizer: Any, max_seq_length: int) -> list[dict]:
        return cut_examples(examples, max_seq_length)

    return _train(run, cls(**params), params, build, out, force=force, resume=resume, device=device,
                  progress=progress, callbacks=callbacks, local_files_only=bool(offline),
                  end_distributed=end_distributed)


def _finetuner_and_parameters(name: str, parameters: dict | None) -> tuple[type, dict]:
    """The registered finetuner class ``name`` and its ``parameters``, checked against its schema, defaults
    filled in."""
    from .recipe import parameter_problems
    from .schema import with_defaults

    component = _registry().get("finetuner", name)
    schema = parameter_schema(component)
    given = dict(parameters or {})
    lines = parameter_problems(given, schema, source=f"finetuner {name}", where=["parameters"])
    if lines:
        raise MergeplugError(*lines)
    cls = component.load()
    if not (isinstance(cls, type) and issubclass(cls, Finetuner)):
        raise MergeplugError(f"{component.describe()}: registers {cls!r}, not a subclass of "
                             "mergeplug.finetuning.Finetuner")
    return cls, with_defaults(given, schema)


def check_examples(examples: Sequence[dict], extra_fields: dict, finetuner: str) -> None:
    """Every example has input_ids, labels of the same length, and each extra field with one row per token."""
    if not examples:
        raise MergeplugError(f"finetuner {finetuner}: no training examples")
    for i, example in enumerate(examples):
        size = len(example.get("input_ids", ()))
        for name in ("labels", *extra_fields):
            if name not in example:
                raise MergeplugError(f"training example {i}: has no {name!r} (finetuner {finetuner} needs "
                                     f"input_ids, labels{''.join(', ' + f for f in extra_fields)})")
            if len(example[name]) != size:
                raise MergeplugError(f"training example {i}: {name!r} has {len(example[name])} rows for {size} "
                                     "input_ids; give one row per token")


def cut_examples(examples: Sequence[dict], max_seq_length: int) -> list[dict]:
    """Examples cut to ``max_seq_length`` tokens, every per-token field with them; one left without a label
    token is dropped."""
    kept = []
    for example in examples:
        cut = {key: value[:max_seq_length] for key, value in example.items()}
        if any(label != IGNORE_INDEX for label in cut["labels"]):
            kept.append(cut)
    return kept


def _registry():
    from .plugins import get_registry

    return get_registry()


# --- checks ------------------------------------------------------------------------------------------------
def resolve_training_domains(names: str | Sequence[str]) -> list:
    """The domains to train on; one without training data is an error naming it."""
    from .data import resolve_domains

    resolved = resolve_domains(names)
    for domain in resolved:
        if not domain.training:
            raise MergeplugError(f"domain {domain.name}: has no training data (its domain.yaml lists no `training` "
                                 "sets); finetune on a capability domain")
    return resolved


def check_base_model(base: str, offline: bool | None = None) -> None:
    """A local folder needs a config.json; a hub id needs a config.json the hub (or its cache) can give. Offline
    (``offline``, else ``HF_HUB_OFFLINE`` read now) or with the hub out of reach, only the cache is asked."""
    from .checkpoint import is_hub_id
    from .data import env_flag, hub_reachable

    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MergeplugError(f"base model {base}: no config.json there; give a Hugging Face model folder or hub id")
        return
    if not is_hub_id(base):
        raise MergeplugError(f"base model {base}: no such folder (and not a hub id of the form owner/name)")
    try:
        from huggingface_hub import hf_hub_download

        if offline is None:
            offline = env_flag("HF_HUB_OFFLINE")
        hf_hub_download(base, "config.json", local_files_only=offline or not hub_reachable())
    except Exception as exc:  # noqa: BLE001 - missing, gated or offline: the user's to fix, in one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MergeplugError(f"base model {base}: no such local folder, and the hub did not give its config.json "
                             f"({type(exc).__name__}: {reason}); check the id, go online or `hf auth login`") from None


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MergeplugError(f"{out}: exists and is not a folder; remove it or choose another output")
    if out.exists() and not force:
        raise MergeplugError(f"{out}: already exists; pass --force to replace it (replaced only once the new model "
                             "is complete)")


def check_device(device: str) -> None:
    """auto, cpu, cuda (one GPU per process: torchrun and accelerate launch give each process its own) or mps."""
    import torch

    if device.startswith("cuda:"):
        raise MergeplugError(f"--device {device}: pick the GPU with CUDA_VISIBLE_DEVICES={device[5:]} and "
                             "--device cuda (several GPUs: torchrun or accelerate launch)")
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise MergeplugError(f"--device {device}: use auto, cpu, cuda or mps")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeplugError("--device cuda: torch sees no CUDA GPU; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise MergeplugError("--device mps: the MPS backend is not available; use --device cpu")


def staging_folder(out: Path) -> Path:
    """Where a run into ``out`` trains and checkpoints: a stable name beside it, so a rerun finds it."""
    return out.parent / f".{out.name}.partial"


# --- training data -----------------------------------------------------------------------------------------
@dataclass
class TrainingSet:
    """The rows of one training entry of a domain (``label`` is ``math.1``), and its mixture weight."""

    domain: Any
    label: str
    rows: list[dict]
    origin: str
    weight: float


def load_training_sets(domains: Sequence[Any], data: dict, *, limit: int | None = None,
                       offline: bool | None = None) -> list[TrainingSet]:
    """Every training entry's rows; ``data`` keys are ``DOMAIN`` (one training set) or ``DOMAIN.N``."""
    from .data import load_rows

    by_name = {d.name: d for d in domains}
    for key in data:
        name, _, index = key.partition(".")
        domain = by_name.get(name)
        if domain is None:
            raise MergeplugError(f"--data {key}: {name!r} is not a domain of this run ({', '.join(by_name)})")
        count = len(domain.training)
        if index and not (index.isdigit() and int(index) < count):
            raise MergeplugError(f"--data {key}: domain {name} has training sets {name}.0 to {name}.{count - 1}")
        if not index and count > 1:
            raise MergeplugError(f"--data {key}: domain {name} has {count} training sets ("
                                 f"{', '.join(str(t.get('dataset', t.get('sample'))) for t in domain.training)}); "
                                 f"name one: {name}.0 to {name}.{count - 1}")
    sets = []
    for domain in domains:
        for i, entry in enumerate(domain.training):
            label = f"{domain.name}.{i}"
            source = data.get(label) or data.get(domain.name)
            if isinstance(source, (str, Path)):
                source = {"data_dir": str(source)} if Path(source).is_dir() else {"data_files": str(source)}
            loaded = load_rows(entry, source=source, limit=limit, offline=offline,
                               label=f"{domain.name}/{entry.get('dataset') or entry.get('sample')}")
            if not loaded.rows:
                raise MergeplugError(f"{label} ({loaded.origin}): no training rows")
            sets.append(TrainingSet(domain, label, loaded.rows, loaded.origin, float(entry.get("weight", 1))))
    return sets


def mixture(sets: Sequence[TrainingSet], seed: int) -> list[tuple[Any, dict]]:
    """(domain, row) pairs of every set, shuffled with ``seed``. A set's ``weight`` w repeats its rows
    int(w) times plus a seeded sample of the fraction left (0.5: half the rows, 2: every row twice)."""
    import random

    rng = random.Random(seed)
    pairs = []
    for s in sets:
        whole, fraction = divmod(s.weight, 1.0)
        chosen = s.rows * int(whole) + rng.sample(s.rows, round(fraction * len(s.rows)))
        pairs += [(s.domain, row) for row in chosen]
    rng.shuffle(pairs)
    return pairs


def tokenize_examples(pairs: Sequence[tuple[Any, dict]], tokenizer: Any, max_seq_length: int) -> list[dict]:
    """``{input_ids, labels}`` per row: prompt + response + EOS, the labels IGNORE_INDEX on the prompt (loss on
    the response only, MergeBench's train_on_inputs: false), cut to ``max_seq_length``. An example left with no
    response token is dropped. Prompt and response are tokenised apart, so the boundary is exact."""
    from .data import render_training_example

    if tokenizer.eos_token_id is None:
        raise MergeplugError("the base model's tokenizer has no EOS token; training needs one to end responses")
    prompts, responses, templated = [], [], []
    for domain, row in pairs:
        prompt, response = render_training_example(domain, row)
        chat = domain.data.get("prompt_format") == "chat"
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise MergeplugError(f"domain {domain.name}: prompt_format chat needs a tokenizer with a chat "
                                     "template; this base model's tokenizer has none")
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
        prompts.append(prompt)
        responses.append(response)
        templated.append(chat)
    prompt_ids: list[list[int]] = [[] for _ in prompts]
    for chat in (False, True):  # a chat template writes its own BOS; a plain prompt gets the tokenizer's
        indices = [i for i, t in enumerate(templated) if t is chat]
        if indices:
            encoded = tokenizer([prompts[i] for i in indices], add_special_tokens=not chat)["input_ids"]
            for i, ids in zip(indices, encoded):
                prompt_ids[i] = list(ids)
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    examples = []
    for prompt, answer in zip(prompt_ids, response_ids):
        answer = list(answer) + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_seq_length]
        labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_seq_length]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    return examples


def pack_examples(examples: Sequence[dict], max_seq_length: int) -> list[dict]:
    """Whole examples concatenated into sequences of at most ``max_seq_length`` tokens, in order (an example
    that does not fit in what is left starts the next sequence). Each keeps its labels, and ``position_ids``
    restart at 0 for each: with no attention mask, transformers then builds a block-diagonal causal mask from
    the restarts (masking_utils.find_packed_sequence_indices, sdpa and eager attention; flash-attention reads
    them as variable-length sequences), so no token attends to another example, as axolotl's sample packing
    in MergeBench. The detection needs the KV cache off, as it is in training (the Trainer's use_cache).
    Any other per-token field of the examples (a finetuner's EXTRA_FIELDS) is concatenated the same way."""
    packed: list[dict] = []
    current: dict[str, list] = {}
    filled = 0
    for example in examples:
        size = len(example["input_ids"])
        if current and filled + size > max_seq_length:
            packed.append(_joined(current))
            current, filled = {}, 0
        filled += size
        for key, value in example.items():
            if key != "position_ids":
                current.setdefault(key, []).append(value)
        current.setdefault("position_ids", []).append(list(range(size)))
    if current:
        packed.append(_joined(current))
    return packed


def _joined(parts: dict[str, list]) -> dict:
    """Each field's pieces joined: lists into one list, numpy arrays into one array (along the tokens)."""
    joined = {}
    for key, pieces in parts.items():
        if any(not isinstance(piece, list) for piece in pieces):
            import numpy as np

            joined[key] = np.concatenate([np.asarray(piece) for piece in pieces])
        else:
            joined[key] = [item for piece in pieces for item in piece]
    return joined


class Collator:
    """Pads a batch on the right to its longest sequence: pad tokens, IGNORE_INDEX labels, and positions that
    restart at 0, so the padding is a separate segment no real token attends to (no attention mask needed).
    ``extra_fields`` (name -> padding value, a finetuner's EXTRA_FIELDS) are padded along the tokens with
    their value: an int pads an int64 tensor, a float a float32 one."""

    def __init__(self, pad_token_id: int, extra_fields: dict[str, int | float] | None = None):
        self.pad_token_id = pad_token_id
        self.extra_fields = dict(extra_fields or {})

    def __call__(self, batch: Sequence[dict]) -> dict:
        import torch

        width = max(len(item["input_ids"]) for item in batch)
        out = {"input_ids": [], "labels": [], "position_ids": []}
        for item in batch:
            pad = width - len(item["input_ids"])
            positions = item.get("position_ids")
            positions = list(range(len(item["input_ids"]))) if positions is None else list(positions)
            out["input_ids"].append(list(item["input_ids"]) + [self.pad_token_id] * pad)
            out["labels"].append(list(item["labels"]) + [IGNORE_INDEX] * pad)
            out["position_ids"].append(positions + list(range(pad)))
        collated = {key: torch.tensor(value, dtype=torch.long) for key, value in out.items()}
        for name, value in self.extra_fields.items():
            collated[name] = self._padded([item[name] for item in batch], width, value)
        return collated

    @staticmethod
    def _padded(rows: Sequence[Any], width: int, value: int | float) -> Any:
        import numpy as np
        import torch

        dtype = np.int64 if isinstance(value, int) and not isinstance(value, bool) else np.float32
        arrays = [np.asarray(row, dtype=dtype) for row in rows]
        shape = next((a.shape[1:] for a in arrays if a.shape[0]), arrays[0].shape[1:])
        out = np.full((len(arrays), width, *shape), value, dtype=dtype)
        for i, array in enumerate(arrays):
            if array.shape[0]:
                out[i, :array.shape[0]] = array
        return torch.from_numpy(out)


# --- logging -----------------------------------------------------------------------------------------------
def _log_callback(path: Path):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Appends {step, epoch, loss, learning_rate, time} to the JSONL log at every logged step (main process)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                line = {"step": state.global_step, "epoch": logs.get("epoch", state.epoch), "loss": logs["loss"],
                        "learning_rate": logs.get("learning_rate"), "time": round(time.time(), 3)}
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")

    return LossLog()


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _keep_log_until(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint a run resumes from: those steps are trained again."""
    kept = [line for line in read_log(path) if line["step"] <= step]
    path.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")


# --- training ----------------------------------------------------------------------------------------------
def _training_arguments(params: dict, staging: Path, device: str, progress: bool):
    import dataclasses
    import os

    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    bf16 = params["bf16"]
    if bf16 == "auto":
        bf16 = cuda and torch.cuda.is_bf16_supported()
    elif bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise MergeplugError("parameters.bf16: this GPU does not support bfloat16; set bf16 to auto or false")
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    # transformers 5 reads a warmup_steps float below 1 as a ratio of the total steps; older ones had warmup_ratio.
    warmup = {"warmup_ratio" if "warmup_ratio" in names else "warmup_steps": params["warmup_ratio"]}
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(staging / "checkpoints"),
        per_device_train_batch_size=params["per_device_batch_size"],
        gradient_accumulation_steps=params["gradient_accumulation_steps"],
        num_train_epochs=params["epochs"],
        max_steps=params["max_steps"] or -1,
        learning_rate=params["learning_rate"],
        lr_scheduler_type=params["lr_scheduler"],
        weight_decay=params["weight_decay"],
        max_grad_norm=params["max_grad_norm"],
        bf16=bool(bf16),
        tf32=True if cuda and torch.cuda.get_device_capability()[0] >= 8 else None,  # MergeBench tf32: true
        save_strategy="steps", save_steps=params["save_steps"], save_total_limit=SAVE_TOTAL_LIMIT,
        logging_strategy="steps", logging_steps=params["logging_steps"],
        seed=params["seed"], data_seed=params["seed"],
        report_to="none", disable_tqdm=not progress, remove_unused_columns=False, dataloader_pin_memory=cuda,
        use_cpu=device == "cpu",
        ddp_backend="gloo" if distributed and not cuda else None,
        **{checkpointing: params["gradient_checkpointing"]}, **warmup,
    )


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written (the Trainer writes it last)."""
    found = [(int(p.name.rpartition("-")[2]), p) for p in folder.glob("checkpoint-*")
             if p.name.rpartition("-")[2].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _prepare_staging(staging: Path, run: dict, resume: bool, main: bool) -> None:
    """Check (every process) then set up (main process) the staging folder of ``run``."""
    recorded = staging / RUN_FILE
    if resume and recorded.is_file():
        before = json.loads(recorded.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(run) if before.get(k) != run.get(k))
        if changed:
            raise MergeplugError(
                f"{staging}: holds an interrupted run with other settings ({', '.join(changed)}); rerun it as it was "
                "to resume, or pass --restart to start over")
    if not main:
        return
    if not resume and staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: the other processes may be reading it for their check.
    partial = staging / f"{RUN_FILE}.{os.getpid()}"
    partial.write_text(json.dumps(run, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(partial, recorded)


def _trainer_class():
    """transformers' Trainer, asking the finetuner for the loss (:meth:`Finetuner.compute_loss`) first."""
    from transformers import Trainer

    class FinetunerTrainer(Trainer):
        def __init__(self, *args: Any, finetuner: Finetuner, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.finetuner = finetuner

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = self.finetuner.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
            if loss is None:
                self.loss_is_scaled_for_ga = None  # the Trainer's own rule for its own loss
                plain = {k: v for k, v in inputs.items() if k not in self.finetuner.EXTRA_FIELDS}
                return super().compute_loss(model, plain, return_outputs, num_items_in_batch)
            # A loss divided by the whole accumulated batch's count is summed over micro-batches as it is; a
            # per-batch mean is divided by the accumulation steps (the Trainer's training_step reads this flag).
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # The count is over every process and DDP averages the gradients: undo that average.
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

    return FinetunerTrainer


def _train(run: dict, finetuner: Finetuner, params: dict, build_examples: Any, out: Path, *, force: bool,
           resume: bool, device: str, progress: bool, callbacks: Sequence[Any],
           local_files_only: bool = False, end_distributed: bool = True) -> Path:
    """Train ``finetuner`` on ``build_examples(tokenizer, max_seq_length)`` (the examples, tokenised with the
    base's tokenizer and cut to ``max_seq_length``) and write the model into ``out``; ``end_distributed``: take
    the process group down at the end (:func:`finetune_examples`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    staging = staging_folder(out)
    args = _training_arguments(params, staging, device, progress)  # sets up torch.distributed under torchrun
    main = args.process_index == 0
    _prepare_staging(staging, run, resume, main=False)
    with args.main_process_first(local=False, desc="staging folder"):
        if main:
            _prepare_staging(staging, run, resume, main=True)

    base = run["base"]
    hub = {"local_files_only": True} if local_files_only else {}
    tokenizer = AutoTokenizer.from_pretrained(base, **hub)
    config = AutoConfig.from_pretrained(base, **hub)
    max_seq_length = params["max_seq_length"]
    # Positions past the model's context were never trained: cap the sequence length there.
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and context < max_seq_length:
        max_seq_length = context
    examples = build_examples(tokenizer, max_seq_length)
    if not examples:
        raise MergeplugError(f"no training example keeps a response token within max_seq_length {max_seq_length}; "
                             "raise max_seq_length")
    sequences = pack_examples(examples, max_seq_length) if params["packing"] else examples
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # float32 master weights, bf16 autocast when bf16 is on (as mixed-precision training keeps them)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **hub)
    model.config.use_cache = False  # no KV cache while training (and none with checkpointing)
    model = finetuner.prepare_model(model)
    if params["gradient_checkpointing"] and hasattr(model, "enable_input_require_grads"):
        # Reentrant checkpointing back-propagates into a block only when its input needs a gradient, which a
        # finetuner that freezes the embeddings (or peft) would otherwise switch off.
        model.enable_input_require_grads()
    log_path = staging / LOG_FILE
    trainer = _trainer_class()(model=model, args=args, train_dataset=sequences, finetuner=finetuner,
                               data_collator=Collator(pad_id, finetuner.EXTRA_FIELDS), processing_class=tokenizer,
                               callbacks=[_log_callback(log_path), *callbacks])
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
    checkpoint = last_checkpoint(staging / "checkpoints") if resume else None
    if checkpoint is not None and main:
        _keep_log_until(log_path, int(checkpoint.name.rpartition("-")[2]))
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    trained = _gathered_model(trainer, finetuner, base)
    if not main:
        if end_distributed:
            end_distributed_run()  # waits for the main process to write the output
        return out
    trained.config.use_cache = True
    folder = staging / "model"
    if folder.exists():  # a save cut short by an earlier interruption
        shutil.rmtree(folder)
    folder.mkdir()
    finetuner.save(trained, tokenizer, folder, base=base)
    log = read_log(log_path)
    (folder / LOG_FILE).write_text("".join(json.dumps(line) + "\n" for line in log), encoding="utf-8")
    from .plotting import line_plot

    line_plot([line["step"] for line in log], [line["loss"] for line in log], folder / PLOT_FILE)
    summary = {**run, "parameters": params, "max_seq_length_used": max_seq_length, "examples": len(examples),
               "sequences": len(sequences), "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
               "final_loss": log[-1]["loss"] if log else None, "train_loss": result.training_loss,
               "resumed_from": checkpoint.name if checkpoint else None}
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    _move_into_place(folder, out, force)
    shutil.rmtree(staging, ignore_errors=True)
    if end_distributed:
        end_distributed_run()
    return out


def end_distributed_run() -> None:
    """Under torchrun: wait for every process, then take the process group down before the interpreter exits
    (a gloo group left alive at exit can abort a process, "terminate called without an active exception").
    A run ends with it unless ``end_distributed=False`` (:func:`finetune_examples`); its caller then calls it
    once on every process, after its last run. Nothing happens when no group was set up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _gathered_model(trainer: Any, finetuner: Finetuner, base: str) -> Any:
    """The trained model, whole, on the main process (None elsewhere when sharded).

    Data parallel: every process holds all of it. FSDP or DeepSpeed ZeRO-3 shard it: the full state dict is
    gathered (a collective call on every process; ZeRO-3 needs stage3_gather_16bit_weights_on_model_save) and
    loaded on the main process into a fresh copy of the base, prepared by the finetuner as it was for training.
    """
    accelerator = trainer.accelerator
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    sharded = trainer.is_fsdp_enabled or (plugin is not None and getattr(plugin, "zero_stage", 0) == 3)
    if not sharded:
        return accelerator.unwrap_model(trainer.model)
    state = accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    import torch
    from transformers import AutoModelForCausalLM

    shell = finetuner.prepare_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    shell.load_state_dict(state)
    return shell


def _move_into_place(folder: Path, out: Path, force: bool) -> None:
    """Rename the finished ``folder`` to ``out``; an existing ``out`` (``force``) is set aside until then."""
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_folder(folder, out)


def saved_dtype(base: str) -> Any:
    """The torch dtype ``base`` is stored in (its config's ``dtype``), None when it does not say: finetuned
    weights are saved in it, so a specialist matches its base as MergeBench's bf16 specialists do."""
    import torch
    from transformers import AutoConfig

    value = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def save_in_base_dtype(model: Any, tokenizer: Any, folder: Path, *, base: str) -> None:
    """Save a full model and its tokenizer into ``folder`` in the dtype ``base`` is stored in
    (:func:`saved_dtype`; as trained when the base does not say)."""
    dtype = saved_dtype(base)
    if dtype is not None:
        model = model.to(dtype)
        model.config.dtype = dtype
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
