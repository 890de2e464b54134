"""Rows for a domain's benchmarks, training sets and validation set, and the prompts rendered from them.

Where rows come from (:func:`load_rows`), first available wins:

1. ``source``: the user's local copy of the data ({data_dir | data_files, split, limit}); JSONL, JSON, parquet
   or CSV, read here directly (parquet and CSV through pyarrow, which ``datasets`` installs), so a malformed
   line is reported with its file and line number.
2. the entry's hub ``dataset``, with ``datasets.load_dataset(dataset, config, split=...)``, when online;
3. the entry's shipped ``sample`` (our own few rows), with a warning on stderr, once per sample.

Offline means: ``offline=True`` (``mergeplug evaluate --offline``) never touches the hub, not even its cache;
``offline=False`` tries the hub whatever the environment says; ``offline=None`` reads ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``: when set, ``datasets`` may still answer from
its local cache (it fails in well under a second when the data set is not cached), then the sample is used.
Online, a failing ``load_dataset`` retries for about 23 s before it gives up (measured with datasets 5.2 on a
machine without DNS), so the hub is probed once per process first (one HTTP request, 5 s timeout, our choice):
when it is out of reach every entry goes straight to its sample. A hub failure that is not a network failure
(a gated or misspelt data set) is an error, never a silent fall-back to 5 rows.

Rows carry OUR field names (the keys of the entry's ``columns``) and ``id``; a sample file, like a local copy,
is in the data set's own columns, so the same mapping applies to all three sources.
"""
from __future__ import annotations

import json
import os
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import MergeplugError

#: File types read from local data, by suffix.
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
#: Seconds to wait for the hub's answer when probing whether it is reachable (our choice).
HUB_PROBE_TIMEOUT_S = 5.0

# MergeBench finetunes its specialists with axolotl's Alpaca prompter (`type: gpteacher` in its
# scripts/llama-3.1-8b_code.yaml; axolotl/prompters.py AlpacaPrompter, instruct style), arXiv:2505.10833.
# The Stanford Alpaca texts, with and without an input; the response follows "### Response:\n" directly.
# MergeBench's merging code (merging/taskloader.py) renders data-aware statistics with an indented variant that
# always uses the with-input preamble; we render statistics with the training template, since they should see
# the text the specialist was trained on.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_MISSING = object()
_warned: set[str] = set()
_hub_reachable: bool | None = None


@dataclass
class Rows:
    """Rows with our field names and an ``id`` each, and where they came from (``hub:…``, ``files:…``,
    ``sample:…``), for messages and records."""

    rows: list[dict]
    origin: str


# --- loading -----------------------------------------------------------------------------------------------
def load_rows(entry: dict, *, source: dict | None = None, limit: int | None = None, offline: bool | None = None,
              label: str = "") -> Rows:
    """The rows of a domain entry (a benchmark, training or validation dict of a loaded domain).

    ``limit`` keeps the first N rows; with the entry's and the source's own ``limit``, the smallest applies.
    ``label`` names the entry in messages (``math/gsm8k``).
    """
    label = label or entry.get("name") or entry.get("dataset") or "data"
    limits = [n for n in (limit, (source or {}).get("limit"), entry.get("limit")) if n is not None]
    limit = min(limits) if limits else None
    if source:
        chunks, origin = _read_source(source, entry, label)
    else:
        chunks, origin = _read_hub_or_sample(entry, limit, offline, label)
    if limit is not None:
        kept, left = [], limit
        for where, rows in chunks:
            kept.append((where, rows[:left]))
            left -= len(kept[-1][1])
        chunks = kept
    return Rows(map_columns(chunks, entry["columns"]), origin)


def _read_hub_or_sample(entry: dict, limit: int | None, offline: bool | None,
                        label: str) -> tuple[list[tuple[str, list[dict]]], str]:
    why = "offline"
    if "dataset" in entry and offline is not True:
        if offline is False or not _env_offline():
            loaded = _read_hub(entry, limit, label) if hub_reachable() else None
            if loaded is not None:
                return loaded
            why = "the hub could not be reached"
        elif _datasets_offline():
            # datasets itself is in offline mode: it answers from its cache, or fails at once.
            loaded = _read_hub(entry, limit, label)
            if loaded is not None:
                return loaded
            why = "offline, and not in the datasets cache"
    if "sample" not in entry:
        where = f"hub data set {entry['dataset']}" if "dataset" in entry else "no data set"
        raise MergeplugError(
            f"{label}: {where} ({why}) and no offline sample; pass local files (data_files or data_dir)"
        )
    rows = read_jsonl(entry["sample"])
    key = f"{label}|{entry['sample']}"
    if key not in _warned and "dataset" in entry:  # a domain with no hub data set ships its data as the sample
        _warned.add(key)
        print(f"mergeplug: using the offline sample of {len(rows)} rows for {label} ({why})", file=sys.stderr)
    return [(entry["sample"], rows)], f"sample:{entry['sample']}"


#: The shuffle seed MergeBench draws its validation samples with (arXiv:2505.10833, uiuctml/MergeBench): the
#: statistics of data-aware mergers and the validation scores of `mergeplug tune` use the same rows.
SHUFFLE_SEED = 42


def shuffled_first(rows: list[dict], limit: int | None, seed: int = SHUFFLE_SEED) -> list[dict]:
    """The first ``limit`` rows after shuffling with ``seed``, in the order ``datasets.Dataset.shuffle(seed)``
    gives (numpy's ``default_rng(seed).permutation``), as MergeBench draws its samples (arXiv:2505.10833)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(rows))
    picked = order if limit is None else order[:limit]
    return [rows[int(i)] for i in picked]


def env_flag(*names: str) -> bool:
    """Whether any of the environment variables ``names`` is set true (1, on, yes, true), as Hugging Face reads
    its ``HF_*_OFFLINE`` flags."""
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in names)


def _env_offline() -> bool:
    return env_flag("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _datasets_offline() -> bool:
    # The flag is read when datasets is imported: an environment set later (a test's monkeypatch) is not seen,
    # and load_dataset would then go to the network.
    import datasets

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all (any HTTP status counts); asked once per process."""
    global _hub_reachable
    if _hub_reachable is None:
        try:
            from huggingface_hub import constants
            from huggingface_hub.utils import get_session

            get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
            _hub_reachable = True
        except Exception:  # noqa: BLE001 - any failure to get an answer means the hub is out of reach
            _hub_reachable = False
    return _hub_reachable


def _read_hub(entry: dict, limit: int | None, label: str) -> tuple[list[tuple[str, list[dict]]], str] | None:
    """The hub data set's rows, or None when the network failed; other failures are errors."""
    import datasets

    dataset, config, split = entry["dataset"], entry.get("config"), entry["split"]
    where = f"{dataset}" + (f" ({config})" if config else "") + f" split {split}"
    try:
        ds = datasets.load_dataset(dataset, config, split=split, **(entry.get("load_options") or {}))
        if hasattr(ds, "select"):
            if limit is not None:
                ds = ds.select(range(min(limit, len(ds))))
            rows = ds.to_list()
        else:  # a streaming data set (load_options: {streaming: true})
            import itertools

            rows = list(itertools.islice(ds, limit))
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; sort network failures from the rest
        if is_network_error(exc):
            return None
        hint = " or run offline to use the shipped sample" if "sample" in entry else ""
        raise MergeplugError(
            f"{label}: cannot load hub data set {where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            f"; check the id and your access (gated data sets need `hf auth login`), pass local files{hint}"
        ) from exc
    return [(f"hub data set {where}", rows)], f"hub:{dataset}" + (f":{config}" if config else "") + f":{split}"


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failure to reach a server, not a refusal by one."""
    names = ("ConnectError", "ConnectionError", "ConnectTimeout", "Timeout", "NetworkError", "OfflineModeIsEnabled",
             "LocalEntryNotFoundError", "gaierror")
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(n in type(exc).__name__ for n in names):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# --- local files -------------------------------------------------------------------------------------------
def _read_source(source: dict, entry: dict, label: str) -> tuple[list[tuple[str, list[dict]]], str]:
    unknown = sorted(set(source) - {"data_dir", "data_files", "split", "limit"})
    if unknown:
        raise MergeplugError(
            f"{label}: local data: unknown key(s) {', '.join(unknown)}; use data_dir or data_files, split, limit")
    split = source.get("split") or entry.get("split") or "train"
    if "data_files" in source:
        files = source["data_files"]
        if isinstance(files, dict):
            if split not in files:
                raise MergeplugError(f"{label}: data_files has no split {split!r} (splits: {', '.join(files)})")
            files = files[split]
        paths = [Path(p) for p in ([files] if isinstance(files, (str, Path)) else files)]
        if len(paths) == 1 and paths[0].is_dir():
            paths = files_for_split(paths[0], split, entry.get("config"), label)
    elif "data_dir" in source:
        paths = files_for_split(Path(source["data_dir"]), split, entry.get("config"), label)
    else:
        raise MergeplugError(f"{label}: local data needs data_dir (a folder) or data_files (one or more files)")
    chunks = []
    for path in paths:
        if not path.is_file():
            raise MergeplugError(f"{label}: local data file {path} does not exist")
        chunks.append((str(path), read_file(path)))
    return chunks, "files:" + ",".join(str(p) for p in paths)


def files_for_split(folder: Path, split: str, config: str | None, label: str = "") -> list[Path]:
    """The data files of ``split`` in a folder laid out like a hub data set: files named after the split
    (``test.jsonl``, ``test-00000-of-00001.parquet``) or inside a folder named after it (``fr/test/0000.parquet``);
    when some of them sit under a folder named after the entry's ``config``, only those."""
    if not folder.is_dir():
        raise MergeplugError(f"{label}: data_dir {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    pattern = re.compile(rf"{re.escape(split)}([-_.].*)?")
    matched = [p for p in files if pattern.fullmatch(p.name.split(".")[0])
               or split in p.relative_to(folder).parts[:-1]]
    if config:
        in_config = [p for p in matched if config in p.relative_to(folder).parts[:-1]]
        matched = in_config or matched
    if not matched:
        found = ", ".join(str(p.relative_to(folder)) for p in files[:10]) or "no JSONL, JSON, parquet or CSV file"
        raise MergeplugError(
            f"{label}: data_dir {folder}: no file for split {split!r} (looked for {split}*.jsonl|json|parquet|csv or "
            f"a {split}/ folder); found: {found}; name the file with data_files"
        )
    return matched


def read_file(path: str | Path) -> list[dict]:
    """Rows of a JSONL, JSON (a list of objects, or one key holding that list), parquet or CSV file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return read_jsonl(path)  # JSON lines in a .json file, as datasets' json loader accepts
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        rows = data if isinstance(data, list) else [data]
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise MergeplugError(f"{path}: row {i} is a JSON {type(row).__name__}, not an object")
        return rows
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            import pyarrow.csv as pacsv

            return pacsv.read_csv(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors name no file
        raise MergeplugError(f"{path}: cannot read the {suffix[1:]} file: {type(exc).__name__}: {exc}") from exc
    raise MergeplugError(f"{path}: unsupported file type {suffix or '(none)'}; use JSONL, JSON, parquet or CSV")


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSONL file, one per non-blank line; a malformed line is an error naming file and line."""
    path = Path(path)
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    raise MergeplugError(
                        f"{path}: line {number}: not valid JSON ({exc.msg}, column {exc.colno}); "
                        f"each line of a JSONL file is one JSON object"
                    ) from None
                if not isinstance(row, dict):
                    raise MergeplugError(f"{path}: line {number}: a JSON {type(row).__name__}, not an object")
                rows.append(row)
    except OSError as exc:
        raise MergeplugError(f"{path}: cannot read: {exc}") from None
    return rows


# --- columns -----------------------------------------------------------------------------------------------
def map_columns(chunks: Iterable[tuple[str, list[dict]]], columns: dict) -> list[dict]:
    """Rows with our field names, from ``(where, rows)`` chunks (one per file; ``where`` names it in errors).

    Each field of ``columns`` is looked up as the domain schema's ``columnSpec`` says, plus ``id``: the mapped id
    column, else the row's index over all chunks. Ids must be unique: results are recorded by id.
    """
    specs = {name: _spec(value) for name, value in columns.items()}
    out, seen = [], {}
    for where, rows in chunks:
        for index, row in enumerate(rows):
            mapped = {name: _field(row, name, spec, index, where) for name, spec in specs.items()}
            mapped.setdefault("id", len(out))
            key = str(mapped["id"])
            if key in seen:
                raise MergeplugError(
                    f"{where}: row {index} has the id {mapped['id']!r} of an earlier row ({seen[key]}); map `id` to a "
                    f"unique column, or leave it out (the row index is then the id)"
                )
            seen[key] = f"{where}: row {index}"
            out.append(mapped)
    return out


def _spec(value: Any) -> dict:
    if isinstance(value, dict):
        spec = dict(value)
        if "pattern" in spec:
            spec["pattern"] = re.compile(spec["pattern"])
        return spec
    return {"column": value}


def _field(row: dict, name: str, spec: dict, index: int, where: str) -> Any:
    if "value" in spec:
        return spec["value"]
    column = spec["column"]
    if isinstance(column, list):
        value = [v for v in (_column(row, c, index, where) for c in column) if v is not None and v != ""]
    else:
        value = _column(row, column, index, where)
    if spec.get("pattern") is not None and value is not None:
        match = spec["pattern"].search(str(value))
        if match is None:
            raise MergeplugError(
                f"{where}: row {index}: field {name!r}: column {column!r} ({_short(value)}) does not match the "
                f"pattern {spec['pattern'].pattern!r}"
            )
        value = (match.group(1) if match.re.groups else match.group(0)).strip()
    kind = spec.get("type")
    if kind and value is not None:
        try:
            value = {"int": int, "float": float, "str": str}[kind](value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise MergeplugError(f"{where}: row {index}: field {name!r}: {_short(value)} is not a valid {kind}") from None
    return value


def _column(row: dict, column: str, index: int, where: str) -> Any:
    value = lookup(row, column)
    if value is _MISSING:
        raise MergeplugError(f"{where}: row {index} has no column {column!r} (columns: {', '.join(map(str, row))})")
    return value


def lookup(row: dict, column: str) -> Any:
    """``row[column]``; a dotted path reaches into nested dicts and lists (``answer.aliases``, ``messages.-1.content``)."""
    if column in row:
        return row[column]
    if "." not in column:
        return _MISSING
    value: Any = row
    for part in column.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


# --- prompts -----------------------------------------------------------------------------------------------
def few_shot_rows(benchmark: dict) -> list[dict]:
    """The benchmark's exemplars: the first ``few_shot`` rows of its ``few_shot_sample`` (our field names)."""
    count = benchmark.get("few_shot", 0)
    if not count:
        return []
    if "few_shot_sample" not in benchmark:
        raise MergeplugError(f"benchmark {benchmark.get('name')}: few_shot is {count} but no few_shot_sample is given")
    rows = read_jsonl(benchmark["few_shot_sample"])
    if len(rows) < count:
        raise MergeplugError(
            f"benchmark {benchmark.get('name')}: few_shot is {count} but {benchmark['few_shot_sample']} holds "
            f"{len(rows)} exemplars"
        )
    return rows[:count]


def render_prompt(benchmark: dict, row: dict, shots: Sequence[dict] = ()) -> str:
    """The prompt of ``row``: each exemplar rendered with ``few_shot_prompt`` (its ``target`` filled in), then
    the row's ``prompt``, all joined by ``few_shot_separator`` (lm-evaluation-harness's layout)."""
    name = benchmark.get("name", "?")
    prompt = benchmark.get("prompt", "{prompt}")
    parts = []
    for i, shot in enumerate(shots):
        where = f"benchmark {name}: exemplar {i}"
        target = _format(benchmark.get("target", "{target}"), shot, f"{where} (target)")
        template = benchmark.get("few_shot_prompt") or prompt + " {target}"
        parts.append(_format(template, {**shot, "target": target}, f"{where} (few_shot_prompt)"))
    parts.append(_format(prompt, row, f"benchmark {name}: row {row.get('id', '?')} (prompt)"))
    return benchmark.get("few_shot_separator", "\n\n").join(parts)


def _format(template: str, fields: dict, where: str) -> str:
    try:
        return template.format_map(fields)
    except KeyError as exc:
        raise MergeplugError(
            f"{where}: the format needs field {exc.args[0]!r}, which the row lacks (fields: {', '.join(map(str, fields))})"
        ) from None
    except (IndexError, AttributeError, ValueError, TypeError) as exc:
        raise MergeplugError(f"{where}: cannot fill {template!r}: {type(exc).__name__}: {exc}") from None


def render_training_example(domain, row: dict) -> tuple[str, str]:
    """(prompt, response) of a training or validation row in the domain's ``prompt_format``.

    ``alpaca``: MergeBench's Alpaca template (above), with the ``### Input:`` block only when the row has an
    input. A template string: the text up to ``{response}`` is the prompt, the row's response plus any text after
    ``{response}`` is the response. ``chat``: the raw instruction (the input appended after a blank line) and the
    response; applying the tokenizer's chat template is the caller's job, since only it has the tokenizer.
    A ``messages`` row contributes its last assistant turn as the response and the user turn before it as the
    instruction (earlier turns are dropped).
    """
    data = getattr(domain, "data", domain)
    name = getattr(domain, "name", data.get("name", "?"))
    instruction, input_text, response = _training_fields(row, name)
    prompt_format = data.get("prompt_format", "alpaca")
    if prompt_format == "alpaca":
        template = ALPACA_WITH_INPUT if input_text else ALPACA_NO_INPUT
        return template.format(instruction=instruction, input=input_text), response
    if prompt_format == "chat":
        return instruction + (f"\n\n{input_text}" if input_text else ""), response
    head, tail, after = [], [], False
    values = {"instruction": instruction, "input": input_text}
    formatter = string.Formatter()
    for literal, field, spec, conversion in formatter.parse(prompt_format):
        (tail if after else head).append(literal)
        if field == "response":
            after = True
        elif field is not None:
            value = formatter.convert_field(formatter.get_field(field, (), values)[0], conversion)
            (tail if after else head).append(formatter.format_field(value, spec or ""))
    return "".join(head), response + "".join(tail)


def _training_fields(row: dict, domain_name: str) -> tuple[str, str, str]:
    if row.get("instruction") is None and row.get("messages"):
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        user = max((i for i, m in enumerate(messages[:last or 0]) if m.get("role") == "user"), default=None)
        if last is None or user is None:
            raise MergeplugError(
                f"domain {domain_name}: row {row.get('id', '?')}: messages need a user turn followed by an assistant turn"
            )
        return str(messages[user].get("content") or ""), "", str(messages[last].get("content") or "")
    for key in ("instruction", "response"):
        if row.get(key) is None:
            raise MergeplugError(f"domain {domain_name}: row {row.get('id', '?')} has no {key} (map it in `columns`)")
    return str(row["instruction"]), str(row.get("input") or ""), str(row["response"])


# --- domains -----------------------------------------------------------------------------------------------
def resolve_domains(names: str | Sequence[str]) -> list:
    """Loaded domains for names: a list, a comma-separated string, or ``all`` (every ``capability`` domain,
    not the ``base_ability`` ones used for forgetting; ``all,general`` adds one). An unknown name is the
    registry's error, which lists the known names closest first."""
    from .plugins import get_registry

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    registry = get_registry()
    expanded: list[str] = []
    for name in names:
        if name == "all":
            candidates = [n for n in registry.names("domain") if registry.get("domain", n).load().role == "capability"]
        else:
            candidates = [name]
        expanded += [n for n in candidates if n not in expanded]
    if not expanded:
        raise MergeplugError("no domain given; name domains (math,coding) or all (see `mergeplug list --kind domain`)")
    return [registry.get("domain", name).load() for name in expanded]
