"""``mergeplug bench``: the MergeBench protocol (arXiv:2505.10833) as a graph of content-addressed steps.

A bench recipe names base models, domains, a finetuner and mergers with grids. It becomes a graph of steps:

  base      (only for a tiny base built here) train a tokenizer and a tiny model on the domains' data
  finetune  one specialist per domain and base, and the multi-task baseline (every domain's mixture)
  merge     every merger x grid point, over the specialists of one base
  evaluate  every model above (and the base) on every domain and base-ability domain

Each step's identity is a hash of what produces it: its kind, its settings and the identities of the steps it
reads (a model given as a path enters with its fingerprint: config and weight files' names, sizes and times). Its
output lives in ``DIR/steps/<kind>-<hash>/`` and a finished step writes ``step.json`` there last, so an
interrupted or extended bench re-runs only what is missing; a step that failed is tried again on the next run.

Steps run through an executor plugin (``local``: in-process or worker processes; ``ray``). Each step records
its wall time and its peak resident memory (the process's high-water mark, reset before the step where Linux
allows it, else the process's peak so far: see :func:`peak_memory`). A step that raises is recorded as failed
with its one-line error; the steps that need its output are recorded as skipped; the rest go on.

Results: ``DIR/results.jsonl`` (one ``step`` row per step, one ``score`` row per model and domain; format in
:mod:`mergeplug.report`), ``DIR/results.csv`` (the score rows, flat), and the report in ``DIR/report/``.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .atomic import write_json, write_text
from .errors import MergeplugError

STEP_FILE = "step.json"
RESULTS_FILE = "results.jsonl"
CSV_FILE = "results.csv"
#: Bump when what a step writes changes: older step folders then stop matching any step.
FORMAT_VERSION = 1


# --- the graph ---------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One unit of bench work. ``config`` (JSON-able) is everything that determines its output; a model it
    reads from another step is written there as ``"step:<id>"`` and resolved to a path when it runs."""

    kind: str  # base | finetune | merge | evaluate
    label: str
    config: dict
    needs: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # role, base, method, parameters, domain...: results, not identity
    resources: dict = field(default_factory=lambda: {"cpus": 1, "gpus": 0})
    id: str = ""

    def identify(self) -> str:
        blob = json.dumps({"format": FORMAT_VERSION, "kind": self.kind, "config": self.config},
                          sort_keys=True, ensure_ascii=False, default=str)
        self.id = f"{self.kind}-{hashlib.sha256(blob.encode('utf-8')).hexdigest()[:12]}"
        return self.id


def _external_model(ref: str) -> dict:
    """A model not made by the bench: its path or hub id, and a fingerprint so a changed model re-runs."""
    from .statistics import model_fingerprint

    fingerprint = model_fingerprint(ref)
    return {"ref": str(Path(ref).resolve()) if Path(ref).is_dir() else ref, "fingerprint": fingerprint}


def _grid_points(grid: dict) -> list[dict]:
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _value_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def merge_label(name: str, point: dict) -> str:
    """``ties density=0.2 scaling=1.0``: a merge's label from its method and grid point."""
    return " ".join([name, *(f"{k}={_value_text(v)}" for k, v in point.items())])


def plan_bench(recipe) -> list[Step]:
    """The steps of a checked bench recipe, dependencies first."""
    from .recipe import base_label

    data = recipe.data
    domains = data["domains"]
    if domains == ["all"]:
        from .data import resolve_domains

        domains = [d.name for d in resolve_domains("all")]
    evaluated = [*domains, *[d for d in data["base_abilities"] if d not in domains]]
    finetuner = data["finetuner"]
    steps: list[Step] = []
    device = data["device"]

    def add(step: Step) -> Step:
        step.identify()
        steps.append(step)
        return step

    def evaluate(model_ref: str, needs: list[str], meta: dict) -> None:
        config = {"model": model_ref, "domains": evaluated, "evaluation": data["evaluation"],
                  "evaluation_data": data.get("evaluation_data") or {}, "device": device,
                  "offline": data["offline"]}
        add(Step("evaluate", f"evaluate {meta['model']}", config, needs, meta))

    for index, entry in enumerate(data["base_models"]):
        base = base_label(entry, index)
        common = {"base": base, "domain_roles": {}}
        if isinstance(entry, dict) and "tiny" in entry:
            # A tiny base is pretrained here, so it learns its base abilities here too: on the mixture of every
            # evaluated domain's training data (no specialist or multi-task baseline trains on a base ability).
            built = add(Step("base", f"{base}: build the tiny base", {"tiny": entry["tiny"], "domains": evaluated},
                             meta={**common, "model": base, "role": "base"}))
            base_ref, base_needs = f"step:{built.id}", [built.id]
        else:
            ref = entry if isinstance(entry, str) else entry["model"]
            base_ref, base_needs = _external_model(ref), []
        evaluate(base_ref, base_needs, {**common, "model": base, "role": "base", "method": None, "parameters": {}})

        def finetune(trained: list[str], role: str, label: str) -> Step:
            config = {"base": base_ref, "domains": trained, "finetuner": finetuner,
                      "training_data": {k: v for k, v in (data.get("training_data") or {}).items()
                                        if k.partition(".")[0] in trained},
                      "limit": data.get("training_limit"), "device": device, "offline": data["offline"]}
            meta = {**common, "model": label, "role": role, "method": finetuner["name"],
                    "parameters": finetuner["parameters"], "specialist_domain": trained[0] if role == "specialist" else None}
            step = add(Step("finetune", f"{base}: finetune {label}", config, list(base_needs), meta))
            evaluate(f"step:{step.id}", [step.id], meta)
            return step

        specialists = {d: finetune([d], "specialist", f"{base}/{d}" if len(data["base_models"]) > 1 else d)
                       for d in domains}
        if data["multitask_baseline"] and len(domains) > 1:
            finetune(list(domains), "multitask", f"{base}/multitask" if len(data["base_models"]) > 1 else "multitask")

        for merger in data["mergers"]:
            fixed = dict(merger.get("parameters") or {})
            for point in _grid_points(merger.get("grid") or {}):
                label = merge_label(merger["name"], point)
                label = f"{base}/{label}" if len(data["base_models"]) > 1 else label
                models = [{"model": f"step:{s.id}", "domain": d} for d, s in specialists.items()]
                for model in models:
                    local = (data.get("training_data") or {}).get(model["domain"])
                    if local:
                        model["data"] = local
                merge_recipe = {"kind": "merge", "name": label, "method": merger["name"], "base_model": base_ref,
                                "models": models, "parameters": {**fixed, **point}, **data["merge"]}
                meta = {**common, "model": label, "role": "merged", "method": merger["name"],
                        "parameters": {**fixed, **point}}
                step = add(Step("merge", f"merge {label}", {"recipe": merge_recipe, "device": device},
                                [*base_needs, *(s.id for s in specialists.values())], meta))
                evaluate(f"step:{step.id}", [step.id], meta)
    return steps


# --- running one step --------------------------------------------------------------------------------------
def _reset_peak_memory() -> bool:
    """Reset this process's resident-memory high-water mark (Linux >= 4.0: ``5`` into clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_memory() -> float | None:
    """The process's peak resident memory in MiB since the last reset (VmHWM), or None where unknown."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    except (ImportError, OSError):
        return None


def _resolve(value: Any, folders: dict[str, str]) -> Any:
    """``"step:<id>"`` -> that step's model folder; an external model entry -> its ref; recursively."""
    if isinstance(value, str) and value.startswith("step:"):
        return str(Path(folders[value[5:]]) / "model")
    if isinstance(value, dict) and set(value) == {"ref", "fingerprint"}:
        return value["ref"]
    if isinstance(value, dict):
        return {k: _resolve(v, folders) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, folders) for v in value]
    return value


def run_step(payload: dict) -> dict:
    """Run one step (in whatever process the executor chose) and return its record; never raises.

    ``payload``: ``id``, ``kind``, ``label``, ``config``, ``folder`` (the step's own output folder) and
    ``folders`` (step id -> output folder of every step it needs).
    """
    folder = Path(payload["folder"])
    started = time.time()
    exact_peak = _reset_peak_memory()
    record = {"id": payload["id"], "kind": payload["kind"], "label": payload["label"], "status": "ok",
              "error": None, "host": os.uname().nodename if hasattr(os, "uname") else None}
    try:
        config = _resolve(payload["config"], payload["folders"])
        folder.mkdir(parents=True, exist_ok=True)
        with _quiet(folder / "warnings.txt"):
            STEP_RUNNERS[payload["kind"]](config, folder)
    except BaseException as exc:  # noqa: BLE001 - recorded; the bench goes on with the steps that do not need it
        if isinstance(exc, KeyboardInterrupt):
            raise
        record["status"] = "failed"
        record["error"] = _one_line(exc)
        (folder / "error.txt").write_text(traceback.format_exc(), encoding="utf-8") if folder.is_dir() else None
    record["seconds"] = round(time.time() - started, 3)
    peak = peak_memory()
    record["peak_memory_mib"] = round(peak, 1) if peak is not None else None
    record["peak_memory_exact"] = exact_peak
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if folder.is_dir():
        write_json(folder / STEP_FILE, record)
    return record


@contextlib.contextmanager
def _quiet(log: Path):
    """Keep a step's own chatter off the bench's display: library progress bars off, warnings into ``log``."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            if caught:
                log.write_text("".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n"
                                       for w in caught), encoding="utf-8")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if isinstance(exc, MergeplugError):
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _threads() -> None:
    """Share the CPU among concurrent steps: MERGEPLUG_THREADS, set by the executor, caps torch's threads."""
    count = os.environ.get("MERGEPLUG_THREADS")
    if count:
        import torch

        torch.set_num_threads(max(1, int(count)))


def _run_base(config: dict, folder: Path) -> None:
    from .tiny import build_tiny_base

    _threads()
    out = folder / "model"
    if out.exists():  # an earlier attempt got as far as the rename; the step did not finish: build again
        shutil.rmtree(out)
    build_tiny_base(config["domains"], out, progress=False, **config["tiny"])


def _run_finetune(config: dict, folder: Path) -> None:
    from .finetuning import finetune

    _threads()
    use = config["finetuner"]
    # finetune() stages in `.model.partial/` beside the output and resumes from its last checkpoint, so an
    # interrupted bench loses at most one checkpoint interval of training.
    finetune(config["base"], config["domains"], folder / "model", finetuner=use["name"],
             parameters=use["parameters"], data=config["training_data"], limit=config["limit"],
             device=config["device"], progress=False, offline=config["offline"] or None,
             force=(folder / "model").exists())


def _run_merge(config: dict, folder: Path) -> None:
    from .engine import merge
    from .recipe import check_recipe

    _threads()
    recipe = check_recipe(config["recipe"], source=f"bench merge {config['recipe']['name']}", kind="merge")
    device = "cpu" if config["device"] == "auto" else config["device"]
    if config["device"] == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    merge(recipe, folder / "model", force=True, device=device, progress=False)


def _run_evaluate(config: dict, folder: Path) -> None:
    from .evaluate_models import EvaluateOptions, evaluate_models

    _threads()
    settings = config["evaluation"]
    backend_options = {"device": config["device"], "dtype": settings.get("dtype", "auto"),
                       "batch_size": settings.get("batch_size", 16)}
    options = EvaluateOptions(backend=settings.get("backend", "transformers"), backend_options=backend_options,
                              limit=settings.get("limit"), data=config["evaluation_data"],
                              offline=config["offline"] or None, progress=False,
                              max_new_tokens=settings.get("max_new_tokens"))
    # Samples already scored in an interrupted attempt are kept (evaluate resumes per sample).
    evaluate_models([config["model"]], config["domains"], folder / "evaluation", options)


STEP_RUNNERS: dict[str, Callable[[dict, Path], None]] = {
    "base": _run_base, "finetune": _run_finetune, "merge": _run_merge, "evaluate": _run_evaluate,
}


# --- executors ---------------------------------------------------------------------------------------------
class Executor:
    """How a bench's steps run: the plugin kind ``executor``.

    The core decides what is ready (every step it needs finished well) and hands it over with ``submit``; the
    executor runs :func:`run_step` on the payload somewhere (this process, a worker process, a Ray task) and
    ``wait`` returns the steps that finished since, as ``(handle, record)`` pairs. ``slots`` is how many steps
    may run at once. A record is what :func:`run_step` returns; if the executor loses a step (a worker died), it
    returns a record with ``status: failed`` and the reason.
    Parameters (the recipe's ``executor.parameters``, defaults filled) arrive as keyword arguments.
    """

    slots: int = 1

    def __init__(self, **parameters: Any):
        self.parameters = parameters

    def start(self) -> None:
        """Called once before the first step."""

    def submit(self, payload: dict, resources: dict) -> Any:
        """Start one step; return a handle ``wait`` will give back."""
        raise NotImplementedError

    def wait(self, handles: list) -> list[tuple[Any, dict]]:
        """Block until at least one submitted step has finished; return every finished one."""
        raise NotImplementedError

    def close(self) -> None:
        """Called once at the end, also after an error or an interruption."""


def failed_record(payload: dict, error: str) -> dict:
    """The record of a step its executor lost (the worker died, the cluster dropped the task)."""
    return {"id": payload["id"], "kind": payload["kind"], "label": payload["label"], "status": "failed",
            "error": error, "seconds": None, "peak_memory_mib": None, "peak_memory_exact": False}


# --- the bench ---------------------------------------------------------------------------------------------
def step_record(folder: Path) -> dict | None:
    """The record of a finished step (``step.json``), or None when it never finished."""
    path = folder / STEP_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record: the step runs again


class Progress:
    """A live line: steps done, running (by label) and left; one printed line per finished step."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="bench", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        self.running: dict[str, str] = {}

    def started(self, step: Step) -> None:
        self.running[step.id] = step.label
        self._show()

    def finished(self, step: Step, record: dict) -> None:
        self.running.pop(step.id, None)
        if self.bar is not None:
            mark = {"ok": "done", "failed": "FAILED", "skipped": "skipped"}[record["status"]]
            seconds = f" in {record['seconds']:.1f} s" if record.get("seconds") is not None else ""
            error = f": {record['error']}" if record.get("error") else ""
            self.bar.write(f"{mark}: {step.label}{seconds}{error}", file=sys.stderr)
            self.bar.update(1)
        self._show()

    def _show(self) -> None:
        if self.bar is not None:
            labels = list(self.running.values())
            shown = ", ".join(labels[:2]) + (f" +{len(labels) - 2}" if len(labels) > 2 else "")
            self.bar.set_postfix_str(f"running: {shown}" if labels else "", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def bench(recipe, output: str | Path, *, executor: str | None = None, executor_parameters: dict | None = None,
          bases: Sequence[str] = (), progress: bool = True, report: bool = True, registry=None) -> dict:
    """Run a bench recipe (a path or a checked recipe) into ``output``; return a summary of what ran.

    ``executor``/``executor_parameters`` override the recipe's; ``bases`` keeps only the base models with those
    labels. Steps already finished in ``output`` are reused; a failed step is retried.
    """
    from .plugins import get_registry
    from .recipe import Recipe, base_label, load_recipe

    registry = registry or get_registry()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, registry=registry, kind="bench")
    if bases:
        labelled = {base_label(entry, i): entry for i, entry in enumerate(recipe.data["base_models"])}
        unknown = [b for b in bases if b not in labelled]
        if unknown:
            raise MergeplugError(f"{recipe.source}: no base model labelled {unknown[0]!r}; "
                                 f"labels: {', '.join(labelled)}")
        recipe.data["base_models"] = [labelled[b] for b in bases]
    out = Path(output).absolute()
    if out.exists() and not out.is_dir():
        raise MergeplugError(f"{out}: exists and is not a folder; choose another output")
    steps = plan_bench(recipe)
    use = recipe.data["executor"]
    name = executor or use["name"]
    component = registry.get("executor", name)
    parameters = dict(use["parameters"]) if name == use["name"] else {}
    parameters.update(executor_parameters or {})
    from .recipe import parameter_problems
    from .schema import with_defaults

    lines = parameter_problems(parameters, component.parameters, source=f"executor {name}", where=["parameters"])
    if lines:
        raise MergeplugError(*lines)
    cls = component.load()
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise MergeplugError(f"{component.describe()}: registers {cls!r}, not a subclass of mergeplug.bench.Executor")
    runner = cls(**with_defaults(parameters, component.parameters))

    out.mkdir(parents=True, exist_ok=True)
    (out / "steps").mkdir(exist_ok=True)
    write_json(out / "bench.json", {"recipe": recipe.data, "source": recipe.source,
                                            "steps": [{"id": s.id, "kind": s.kind, "label": s.label,
                                                       "needs": s.needs} for s in steps]})
    by_id = {s.id: s for s in steps}
    folders = {s.id: str(out / "steps" / s.id) for s in steps}
    records: dict[str, dict] = {}
    for step in steps:
        found = step_record(Path(folders[step.id]))
        if found and found.get("status") == "ok":
            records[step.id] = {**found, "reused": True}
    ran = [s.id for s in steps if s.id not in records]
    display = Progress(len(steps), len(records), progress)
    _write_results(out, steps, records)
    pending = [s for s in steps if s.id not in records]
    running: dict[Any, Step] = {}
    try:
        runner.start()
        while pending or running:
            for step in list(pending):
                if len(running) >= max(1, runner.slots):
                    break
                states = [records.get(n, {}).get("status") for n in step.needs]
                if any(state in ("failed", "skipped") for state in states):
                    failed = next(by_id[n].label for n in step.needs if records[n]["status"] in ("failed", "skipped"))
                    records[step.id] = {"id": step.id, "kind": step.kind, "label": step.label, "status": "skipped",
                                        "error": f"needs {failed!r}, which did not finish", "seconds": None,
                                        "peak_memory_mib": None}
                    pending.remove(step)
                    display.finished(step, records[step.id])
                    continue
                if not all(state == "ok" for state in states):
                    continue
                payload = {"id": step.id, "kind": step.kind, "label": step.label, "config": step.config,
                           "folder": folders[step.id], "folders": {n: folders[n] for n in step.needs}}
                handle = runner.submit(payload, step.resources)
                running[handle] = step
                pending.remove(step)
                display.started(step)
            if not running:
                continue
            for handle, record in runner.wait(list(running)):
                step = running.pop(handle)
                records[step.id] = record
                display.finished(step, record)
                _write_results(out, steps, records)
    finally:
        runner.close()
        display.close()
    _write_results(out, steps, records, csv_too=True)
    written = None
    if report:
        try:
            from .report import write_report

            written = write_report(out / RESULTS_FILE, out / "report")
        except MergeplugError as exc:
            print(f"mergeplug: warning: no report: {exc}", file=sys.stderr)
    counts = {state: sum(r["status"] == state for r in records.values()) for state in ("ok", "failed", "skipped")}
    return {"output": str(out), "steps": len(steps), "ran": len([i for i in ran if i in records]), **counts,
            "report": str(written) if written else None}


# --- results -----------------------------------------------------------------------------------------------
def score_rows(step: Step, folder: Path) -> list[dict]:
    """The ``score`` rows of a finished evaluate step: one per domain, from its metrics.json."""
    from .evaluate_models import domain_score

    evaluation = folder / "evaluation"
    metrics_files = list(evaluation.glob("*/metrics.json"))
    if not metrics_files:
        return []
    metrics = json.loads(metrics_files[0].read_text(encoding="utf-8"))
    roles = _domain_roles(step.config["domains"])
    rows = []
    for domain, benchmarks in metrics.get("domains", {}).items():
        rows.append({
            "type": "score", "model": step.meta["model"], "role": step.meta["role"], "base": step.meta["base"],
            "method": step.meta.get("method"), "parameters": step.meta.get("parameters") or {},
            "domain": domain, "domain_role": roles.get(domain, "capability"),
            "specialist_domain": step.meta.get("specialist_domain"), "score": _nan_none(domain_score(benchmarks)),
            "benchmarks": {name: {"metric": entry["headline"],
                                  "value": entry["metrics"].get(entry["headline"], {}).get("value"),
                                  "stderr": entry["metrics"].get(entry["headline"], {}).get("stderr")}
                           for name, entry in benchmarks.items()},
            "step": step.id,
        })
    return rows


def _nan_none(value: float) -> float | None:
    return None if value != value else value  # NaN -> null: JSON has no NaN


_ROLE_CACHE: dict[str, str] = {}


def _domain_roles(names: Iterable[str]) -> dict[str, str]:
    from .plugins import get_registry

    registry = get_registry()
    for name in names:
        if name not in _ROLE_CACHE:
            try:
                _ROLE_CACHE[name] = registry.get("domain", name).load().role
            except MergeplugError:
                _ROLE_CACHE[name] = "capability"
    return {name: _ROLE_CACHE[name] for name in names}


def _step_row(step: Step, record: dict | None) -> dict:
    record = record or {}
    return {"type": "step", "id": step.id, "kind": step.kind, "label": step.label,
            "status": record.get("status", "pending"), "error": record.get("error"),
            "seconds": record.get("seconds"), "peak_memory_mib": record.get("peak_memory_mib"),
            "reused": bool(record.get("reused")), "model": step.meta.get("model"),
            "base": step.meta.get("base"), "role": step.meta.get("role"), "method": step.meta.get("method"),
            "parameters": step.meta.get("parameters") or {}}


def _write_results(out: Path, steps: Sequence[Step], records: dict[str, dict], *, csv_too: bool = False) -> None:
    """Rewrite results.jsonl from the step records (deterministic order: the plan's), and results.csv."""
    rows = [_step_row(s, records.get(s.id)) for s in steps]
    scores = []
    for step in steps:
        if step.kind == "evaluate" and records.get(step.id, {}).get("status") == "ok":
            scores += score_rows(step, out / "steps" / step.id)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows + scores)
    write_text(out / RESULTS_FILE, text)
    if csv_too:
        _write_csv(out / CSV_FILE, steps, records, scores)


def _write_csv(path: Path, steps: Sequence[Step], records: dict[str, dict], scores: list[dict]) -> None:
    """One row per model and domain, with the cost of the step that made the model beside its score."""
    made_by = {}
    for step in steps:
        if step.kind in ("base", "finetune", "merge"):
            made_by[(step.meta.get("base"), step.meta.get("model"))] = records.get(step.id, {})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "role", "base", "method", "parameters", "domain", "domain_role", "score",
                     "make_seconds", "make_peak_memory_mib"])
    for row in scores:
        made = made_by.get((row["base"], row["model"]), {})
        writer.writerow([row["model"], row["role"], row["base"], row["method"] or "",
                         json.dumps(row["parameters"], sort_keys=True), row["domain"], row["domain_role"],
                         "" if row["score"] is None else row["score"],
                         "" if made.get("seconds") is None else made["seconds"],
                         "" if made.get("peak_memory_mib") is None else made["peak_memory_mib"]])
    write_text(path, buffer.getvalue())


