"""The tiny world: a small tokenizer and a tiny Llama-style base trained here, in a minute, on synthetic domains.

``mergeplug bench tiny`` runs MergeBench's protocol (arXiv:2505.10833: finetune one specialist per domain and a
multi-task baseline from one base, merge the specialists, evaluate everything on every domain) without the hub.
The domains are procedurally generated plugins (role ``synthetic``, and ``tiny_reversal`` of role
``base_ability``, learnt by the base in pretraining and by no specialist, for forgetting); this module knows none
of them by name. It gives:

- :func:`build_tiny_base`: a BPE tokenizer trained on the domains' training and validation text, a Llama-style
  config, a seeded initialisation, and a brief pretraining on the mixture of the domains' training data through
  :func:`mergeplug.finetuning.finetune` (the ``full`` finetuner), written atomically as a Hugging Face folder that
  ``AutoModelForCausalLM`` and ``AutoTokenizer`` load;
- :data:`TINY_DEFAULTS`: the settings calibrated with ``benchmarks/tiny_world_signal.py`` on a 2-core CPU (base,
  specialist finetuning, evaluation), and :data:`TINY_SMALLER`, a test-sized variant that still yields every row;
- helpers the domains' generators share (:func:`split_pool`, :func:`write_rows`, :func:`generator_main`).

Every number here is our choice, made by calibration (MergeBench has no tiny setting); the calibration's
requirement: each specialist beats the base clearly on its own domain, and base + 6 finetunes + 7 evaluations
take about 7 minutes on the 2-core machine this project is developed on.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .atomic import write_text
from .errors import MergeplugError

#: Settings of :func:`build_tiny_base` (our choices, by calibration). A 1.1M-parameter Llama (4 layers of 128,
#: 4 heads, MLP 384, context 256, 1,024 tokens) trained for one epoch over the mixture (about 200 steps of 8 packed
#: sequences, cosine schedule from 3e-3): enough for the skills every domain shares (the Alpaca layout, copying
#: from the request), not for each domain's own. In calibration, a quarter of an epoch left a base whose
#: specialists' task vectors wrecked one another when merged (merges kept nothing of the gains); a full epoch made
#: merges keep about half of them.
BASE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden": 128,
    "layers": 4,
    "heads": 4,
    "kv_heads": 4,
    "intermediate": 384,
    "max_seq_length": 256,
    "epochs": 1.0,
    "learning_rate": 3e-3,
    "batch_size": 8,
    "seed": 0,
}
#: Parameters of the ``full`` finetuner for the specialists and the multi-task baseline (our choices, by
#: calibration): MergeBench's 2 epochs and cosine schedule (arXiv:2505.10833), at a tenth of the base's peak
#: learning rate rather than MergeBench's 2e-5 (which suits its 2B-9B models, not a model trained minutes ago),
#: packed sequences of 256 tokens, 8 per step.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 3e-4,
    "epochs": 2,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.05,
    "per_device_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_seq_length": 256,
    "packing": True,
    "save_steps": 100_000,  # a tiny run is redone rather than resumed: no checkpoint writes
    "logging_steps": 10,
    "seed": 42,
}
#: Evaluation settings: the transformers backend on the CPU in float32, 64 sequences per batch (32, 64 and 128
#: measured the same; the benchmarks' generation lengths are set in each domain's file).
EVALUATE_DEFAULTS: dict[str, Any] = {
    "backend": "transformers",
    "backend_options": {"device": "cpu", "dtype": "float32", "batch_size": 64},
}
#: Threads per process. One: with another process busy on one of 2 cores, torch's second thread kept the first
#: waiting (generation 7x slower, training up to 5x), while on an idle machine two threads were only about 1.5x
#: faster than one; two processes side by side, one thread each, use both cores without that risk.
RUNTIME_DEFAULTS: dict[str, Any] = {"torch_threads": 1}
TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "base": BASE_DEFAULTS, "finetune": FINETUNE_DEFAULTS, "evaluate": EVALUATE_DEFAULTS, "runtime": RUNTIME_DEFAULTS,
}
#: A test-sized variant (base + 6 finetunes + 7 evaluations in well under a minute and a half): every step runs on
#: a smaller model, a few hundred rows per domain and a few benchmark rows; the numbers show no signal.
TINY_SMALLER: dict[str, dict[str, Any]] = {
    "base": {**BASE_DEFAULTS, "hidden": 64, "layers": 2, "intermediate": 128, "vocab_size": 512, "max_steps": 10,
             "limit": 300},
    "finetune": {**FINETUNE_DEFAULTS, "epochs": 1, "max_steps": 8},
    "evaluate": {**EVALUATE_DEFAULTS, "limit": 12},
    "runtime": RUNTIME_DEFAULTS,
}

BASE_FILE = "mergeplug_tiny_base.json"


# --- the generators' helpers ----------------------------------------------------------------------------------
def split_pool(pool: Sequence[Any], sizes: Mapping[str, int | None], rng: random.Random) -> dict[str, list]:
    """Distinct items, shuffled with ``rng`` and cut into consecutive parts of ``sizes`` (in its order; a last
    size of None takes the rest), so the parts are disjoint by construction. Too small a pool is an error."""
    items = list(pool)
    keys = [repr(item) for item in items]  # a generator builds equal items alike, so equal items print alike
    if len(set(keys)) != len(keys):
        raise MergeplugError("split_pool: the pool holds duplicate items; parts would not be disjoint")
    if None in list(sizes.values())[:-1]:
        raise MergeplugError("split_pool: only the last part's size may be None (the rest)")
    needed = sum(size for size in sizes.values() if size is not None)
    if needed > len(items):
        raise MergeplugError(f"split_pool: {needed} items asked for ({dict(sizes)}) but the pool holds {len(items)}")
    rng.shuffle(items)
    parts, start = {}, 0
    for name, size in sizes.items():
        end = len(items) if size is None else start + size
        parts[name] = items[start:end]
        start = end
    return parts


def write_rows(folder: str | Path, parts: Mapping[str, Sequence[dict]]) -> list[Path]:
    """Write each part as ``<folder>/<name>.jsonl`` (one JSON object per line, UTF-8); the paths written."""
    folder = Path(folder)
    written = []
    for name, rows in parts.items():
        path = folder / f"{name}.jsonl"
        write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        written.append(path)
    return written


def generator_main(generate: Callable[..., Mapping[str, Sequence[dict]]], folder: Path, seed: int,
                   argv: Sequence[str]) -> int:
    """The command line of a domain's ``generate.py``: write the files (default: the shipped ones, into the
    domain's folder), or ``--check`` that the shipped files are what the generator makes."""
    parser = argparse.ArgumentParser(description=f"Regenerate the data files of {folder.name}.")
    parser.add_argument("--seed", type=int, default=seed, help=f"generator seed (shipped files: {seed})")
    parser.add_argument("-o", "--output", type=Path, default=folder, help="folder to write (default: the domain's)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --output; write nothing")
    args = parser.parse_args(list(argv))
    parts = generate(args.seed)
    if args.check:
        from .data import read_jsonl

        stale = [name for name, rows in parts.items()
                 if not (args.output / f"{name}.jsonl").is_file() or read_jsonl(args.output / f"{name}.jsonl") != rows]
        for name in stale:
            print(f"{args.output / (name + '.jsonl')}: differs from what the generator makes", file=sys.stderr)
        return 1 if stale else 0
    args.output.mkdir(parents=True, exist_ok=True)
    for path, rows in zip(write_rows(args.output, parts), parts.values()):
        print(f"{path}: {len(rows)} rows")
    return 0


# --- the base -------------------------------------------------------------------------------------------------
def build_tiny_base(domains: str | Sequence[str], output: str | Path, *,
                    vocab_size: int = BASE_DEFAULTS["vocab_size"], hidden: int = BASE_DEFAULTS["hidden"],
                    layers: int = BASE_DEFAULTS["layers"], heads: int = BASE_DEFAULTS["heads"],
                    kv_heads: int = BASE_DEFAULTS["kv_heads"], intermediate: int = BASE_DEFAULTS["intermediate"],
                    max_seq_length: int = BASE_DEFAULTS["max_seq_length"], epochs: float = BASE_DEFAULTS["epochs"],
                    max_steps: int | None = None, learning_rate: float = BASE_DEFAULTS["learning_rate"],
                    batch_size: int = BASE_DEFAULTS["batch_size"], seed: int = BASE_DEFAULTS["seed"],
                    limit: int | None = None, device: str = "auto", force: bool = False,
                    offline: bool | None = None, progress: bool = True) -> Path:
    """Train a tokenizer and a tiny Llama-style base on ``domains`` into ``output``; return the folder.

    1. A byte-level BPE tokenizer of at most ``vocab_size`` tokens (digits kept one per token, so numbers read
       digit by digit) trained on the domains' training and validation rows as their prompt format renders them;
       the format's fixed text (Alpaca's preamble, ``### Response:``) becomes one added token per piece, as a
       chat template's markers are, so a sequence is mostly content. A BOS token starts every prompt.
    2. A Llama config (:func:`mergeplug.testing.tiny_config`: ``layers`` x ``hidden``, ``heads`` query heads and
       ``kv_heads`` key/value heads, an MLP of ``intermediate``, context ``max_seq_length``), initialised from
       ``seed`` as transformers initialises Llama.
    3. A brief pretraining on the mixture of the domains' training sets with :func:`mergeplug.finetuning.finetune`
       (the ``full`` finetuner; loss on the responses, packed sequences): ``epochs`` passes (a fraction: that
       share of the shuffled mixture) or ``max_steps`` steps of ``batch_size`` sequences, cosine schedule peaking
       at ``learning_rate``.

    ``limit`` keeps the first N rows of each training and validation set (tests); ``device``, ``offline`` and
    ``progress`` go to :func:`~mergeplug.finetuning.finetune`. Everything happens in ``.OUTPUT.tiny-partial/``
    beside ``output``, renamed into place when complete (an existing ``output`` needs ``force``). Defaults:
    :data:`BASE_DEFAULTS`, our calibrated choices. The folder also holds ``mergeplug_tiny_base.json`` (these
    settings and the format's tokens) and the pretraining's ``mergeplug_finetune.json`` and loss log.
    """
    from .checkpoint import replace_folder
    from .finetuning import check_output, finetune, resolve_training_domains

    out = Path(output).expanduser().absolute()
    check_output(out, force)
    sizes = {"vocab_size": vocab_size, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
             "intermediate": intermediate, "max_seq_length": max_seq_length, "batch_size": batch_size}
    bad = [f"{k}={v!r}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise MergeplugError(f"build_tiny_base: {', '.join(bad)}: give positive whole numbers")
    if hidden % heads or heads % kv_heads:
        raise MergeplugError(f"build_tiny_base: hidden={hidden} must be a multiple of heads={heads}, and heads a "
                             f"multiple of kv_heads={kv_heads}")
    resolved = resolve_training_domains(domains)
    texts, pieces = _corpus(resolved, offline, limit)
    staging = out.parent / f".{out.name}.tiny-partial"
    if staging.exists():
        shutil.rmtree(staging)
    init = staging / "init"
    try:
        tokenizer = train_tokenizer(texts, pieces, init, vocab_size=vocab_size)
        _write_initial_model(init, tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                             intermediate=intermediate, max_seq_length=max_seq_length, seed=seed)
        parameters = {**FINETUNE_DEFAULTS, "learning_rate": learning_rate, "epochs": epochs, "max_steps": max_steps,
                      "per_device_batch_size": batch_size, "max_seq_length": max_seq_length, "seed": seed}
        trained = finetune(str(init), [d.name for d in resolved], staging / "base", finetuner="full",
                           parameters=parameters, limit=limit, device=device, progress=progress, offline=offline)
        record = {"domains": [d.name for d in resolved], **sizes, "vocab_size_used": len(tokenizer),
                  "epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate, "seed": seed,
                  "limit": limit, "format_tokens": pieces}
        (trained / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_folder(trained, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _corpus(domains: Sequence[Any], offline: bool | None, limit: int | None) -> tuple[list[str], list[str]]:
    """The rendered training and validation texts of ``domains``, and their prompt formats' fixed pieces."""
    from .data import load_rows, render_training_example

    texts: list[str] = []
    pieces: list[str] = []
    for domain in domains:
        entries = [*domain.training, *([domain.validation] if domain.validation else [])]
        for entry in entries:
            label = f"{domain.name}/{entry.get('dataset') or entry.get('sample')}"
            for row in load_rows(entry, offline=offline, limit=limit, label=label).rows:
                prompt, response = render_training_example(domain, row)
                texts.append(prompt + response)
        for piece in format_pieces(domain):
            if piece not in pieces:
                pieces.append(piece)
    return texts, [piece for piece in pieces if any(piece in text for text in texts)]


#: Stand-ins for a row's fields, to find a prompt format's fixed text (characters no real row holds).
_FIELD_MARK = "\x00"


def format_pieces(domain: Any) -> list[str]:
    """The fixed text a domain's prompt format puts around a row's fields (Alpaca: the preamble up to the
    instruction, then ``\\n\\n### Response:\\n``; with an input, its pieces too). A ``chat`` format has none here:
    its template belongs to a tokenizer."""
    from .data import render_training_example

    if getattr(domain, "data", {}).get("prompt_format") == "chat":
        return []
    pieces: list[str] = []
    for row in ({"instruction": _FIELD_MARK, "response": _FIELD_MARK},
                {"instruction": _FIELD_MARK, "input": _FIELD_MARK, "response": _FIELD_MARK}):
        prompt, response = render_training_example(domain, row)
        for piece in (prompt + response).split(_FIELD_MARK):
            if piece.strip() and piece not in pieces:
                pieces.append(piece)
    return pieces


def train_tokenizer(texts: Sequence[str], pieces: Sequence[str], folder: str | Path, *, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (each digit its own token), ``pieces`` added as whole
    tokens, BOS before every encoded text; saved to ``folder`` and returned (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos = "<pad>", "<s>", "</s>"
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one (with the space before them): a number is then the same digit tokens wherever it appears.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" ?[0-9]"), "isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < 3 + len(alphabet) + len(pieces):
        raise MergeplugError(f"build_tiny_base: vocab_size={vocab_size} is below the {3 + len(alphabet) + len(pieces)} "
                             "tokens a byte-level tokenizer needs (3 special, 256 bytes, the format's pieces)")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(pieces), special_tokens=[pad, bos, eos],
                                  initial_alphabet=alphabet, show_progress=False)
    # The pieces are whole tokens: merges are spent on the rest of the text.
    tokenizer.train_from_iterator((_without(text, pieces) for text in texts), trainer=trainer)
    tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece in pieces])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(folder))
    return wrapped


def _without(text: str, pieces: Sequence[str]) -> str:
    for piece in pieces:
        text = text.replace(piece, "\n")
    return text


def _write_initial_model(folder: Path, tokenizer: Any, *, hidden: int, layers: int, heads: int, kv_heads: int,
                         intermediate: int, max_seq_length: int, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from .testing import tiny_config

    config = tiny_config("llama", num_layers=layers, hidden=hidden, vocab_size=len(tokenizer), heads=heads,
                         kv_heads=kv_heads, intermediate=intermediate, max_position_embeddings=max_seq_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.dtype = torch.float32
    model.save_pretrained(str(folder))
