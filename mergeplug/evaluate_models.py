"""``mergeplug evaluate``: run models on domains' benchmarks, keep every per-sample record, aggregate, compare.

Layout of the output folder::

    OUT/<model key>/model.json                     which model this folder holds
    OUT/<model key>/<domain>/<benchmark>.jsonl     one record per sample: id, prompt, outputs, scores, details
    OUT/<model key>/metrics.json                   aggregate metrics with standard errors, per benchmark
    OUT/summary.json, OUT/summary.md               every model's domain scores and the comparisons

Records are appended as samples are scored, so an interrupted run loses at most the batch in flight, and a rerun
skips every sample whose record matches its prompt and settings (a changed prompt or setting scores it again).
``metrics.json`` and the summaries are written to a temporary file and renamed, never left half-written.

Comparisons, as MergeBench defines them (arXiv:2505.10833):
- normalised performance of a model in a capability domain = its domain score / the domain specialist's score
  (same benchmarks, same settings), and its mean over the domains that have a specialist;
- forgetting = the base model's score minus the model's, relative to the base's, on each benchmark of the
  ``base_ability`` domains (``general``), averaged. MergeBench does not publish its exact formula: the relative
  drop is our choice, the absolute drop is reported beside it.
A domain score is the weighted mean of its benchmarks' headline metrics (each benchmark's ``metric``, else its
evaluator's first metric; ``weight`` defaults to 1).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .atomic import write_json, write_text
from .errors import MergeplugError
from .evaluation import Metric, Scored

#: Samples scored per round trip to the backend: large enough for full batches, small enough that an
#: interruption loses little.
ROUND_SAMPLES = 64


@dataclass
class EvaluateOptions:
    backend: str = "transformers"
    backend_options: dict = field(default_factory=dict)  # device, dtype, batch_size, chat_template, ...
    limit: int | None = None
    data: dict = field(default_factory=dict)  # benchmark name (or domain.benchmark) -> dataSource
    offline: bool | None = None
    progress: bool = True
    max_new_tokens: int | None = None  # caps every benchmark's generation length (quick smoke runs)


def model_key(model: str) -> str:
    """A folder name for a model: its last path part, plus a short hash of where it is (two folders named
    ``final`` stay apart)."""
    where = str(Path(model).resolve()) if Path(model).exists() else model
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model.rstrip("/")).name or model)[:60]
    return f"{stem}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def _settings_key(prompt: str, generation: dict, evaluator: str, parameters: dict) -> str:
    blob = json.dumps([prompt, generation, evaluator, parameters], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _read_records(path: Path) -> dict[str, dict]:
    """Records by sample id; a torn last line (an interrupted write) is dropped and rewritten later."""
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[str(record["id"])] = record
    return records


def _write_json_atomic(path: Path, data: Any) -> None:
    write_json(path, data, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    return str(value)


def _clean(value: Any) -> Any:
    """NaN to None so that JSON readers other than Python's accept the files."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# --- one benchmark ------------------------------------------------------------------------------------------
@dataclass
class BenchmarkPlan:
    domain: str
    benchmark: dict
    evaluator_name: str
    evaluator: Any
    parameters: dict
    rows: list[dict]
    origin: str
    prompts: list[str]
    keys: list[str]
    generation: dict

    @property
    def name(self) -> str:
        return self.benchmark["name"]

    @property
    def headline(self) -> str:
        return self.benchmark.get("metric") or (self.evaluator.metrics[0] if self.evaluator.metrics else "")


def plan_benchmark(domain, benchmark: dict, options: EvaluateOptions) -> BenchmarkPlan:
    """Load a benchmark's rows and evaluator and render every prompt; no model is touched."""
    from . import data as data_module
    from .plugins import get_registry
    from .schema import problems, with_defaults

    component = get_registry().get("evaluator", benchmark["evaluator"])
    given = benchmark.get("evaluator_parameters") or {}
    lines = problems(given, component.parameters, source=f"domain {domain.name}",
                     prefix=["benchmarks", benchmark["name"], "evaluator_parameters"])
    if lines:
        raise MergeplugError(*lines)
    parameters = with_defaults(given, component.parameters)
    evaluator = component.load()(**parameters)
    source = options.data.get(f"{domain.name}.{benchmark['name']}") or options.data.get(benchmark["name"])
    loaded = data_module.load_rows(benchmark, source=source, limit=options.limit, offline=options.offline,
                                   label=f"{domain.name}/{benchmark['name']}")
    rows = loaded.rows
    missing = [f for f in getattr(evaluator, "required_fields", ()) if rows and f not in rows[0]]
    if missing:
        raise MergeplugError(
            f"{loaded.origin}: benchmark {domain.name}/{benchmark['name']} lacks field(s) {', '.join(missing)} "
            f"that evaluator {component.name!r} needs; map them in the domain's `columns`"
        )
    shots = data_module.few_shot_rows(benchmark)
    prompts = [data_module.render_prompt(benchmark, row, shots) for row in rows]
    generation = dict(benchmark.get("generation") or {})
    if options.max_new_tokens is not None and generation.get("max_new_tokens", options.max_new_tokens) > options.max_new_tokens:
        generation["max_new_tokens"] = options.max_new_tokens
    keys = [_settings_key(p, generation, component.name, parameters) for p in prompts]
    return BenchmarkPlan(domain.name, benchmark, component.name, evaluator, parameters, rows, loaded.origin, prompts,
                         keys, generation)


def _answers_for_record(answers: list) -> list:
    out = []
    for a in answers:
        if hasattr(a, "__dataclass_fields__"):
            out.append({k: getattr(a, k) for k in a.__dataclass_fields__})
        else:
            out.append(a)
    return out


def run_benchmark(plan: BenchmarkPlan, records_path: Path, get_backend, *, progress: bool = True) -> dict[str, Metric]:
    """Score every sample not already recorded, append the records, and aggregate over all of them."""
    records = _read_records(records_path)
    pending = [i for i, (row, key) in enumerate(zip(plan.rows, plan.keys))
               if records.get(str(row["id"]), {}).get("key") != key]
    label = f"{plan.domain}/{plan.name}"
    if progress:
        cached = len(plan.rows) - len(pending)
        print(f"  {label}: {len(plan.rows)} samples from {plan.origin}"
              + (f" ({cached} already scored)" if cached else ""), file=sys.stderr)
    if pending:
        records_path.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite the file with the records still valid: drops stale ones (changed prompt or settings) and a
        # torn last line, so it holds one line per sample.
        key_of = {str(row["id"]): key for row, key in zip(plan.rows, plan.keys)}
        # Records of samples outside this run (a smaller --limit) are kept as they are.
        records = {k: r for k, r in records.items() if key_of.get(k, r.get("key")) == r.get("key")}
        write_text(records_path, "".join(
            json.dumps(_clean(r), ensure_ascii=False, default=_json_default) + "\n" for r in records.values()))
        backend = get_backend()
        generation = plan.generation
        with records_path.open("a", encoding="utf-8") as f:
            for start in range(0, len(pending), ROUND_SAMPLES):
                chunk = pending[start:start + ROUND_SAMPLES]
                per_sample = [plan.evaluator.requests(plan.rows[i], plan.prompts[i], generation) for i in chunk]
                flat = [r for reqs in per_sample for r in reqs]
                answers = backend.run(flat)
                grouped, at = [], 0
                for reqs in per_sample:
                    grouped.append(answers[at:at + len(reqs)])
                    at += len(reqs)
                scored = plan.evaluator.score_batch([plan.rows[i] for i in chunk], grouped)
                for i, got, s in zip(chunk, grouped, scored):
                    record = {"id": plan.rows[i]["id"], "key": plan.keys[i], "prompt": plan.prompts[i],
                              "outputs": _answers_for_record(got), "scores": s.scores, "details": s.details}
                    records[str(plan.rows[i]["id"])] = record
                    f.write(json.dumps(_clean(record), ensure_ascii=False, default=_json_default) + "\n")
                f.flush()
    wanted = {str(row["id"]) for row in plan.rows}
    scored = [Scored(r["scores"], r.get("details") or {}) for k, r in records.items() if k in wanted]
    return plan.evaluator.aggregate(scored)


# --- many models ---------------------------------------------------------------------------------------------
def evaluate_models(models: Sequence[str], domains: Sequence[str] | str, output: str | Path,
                    options: EvaluateOptions | None = None, *, base: str | None = None,
                    specialists: dict[str, str] | None = None) -> dict:
    """Evaluate ``models`` (and ``base``/``specialists`` for the comparisons) on ``domains``; return the summary."""
    from . import data as data_module
    from .runner import open_backend

    options = options or EvaluateOptions()
    specialists = dict(specialists or {})
    resolved = data_module.resolve_domains(domains)
    names = {d.name for d in resolved}
    for domain_name in specialists:
        if domain_name not in names:
            raise MergeplugError(f"specialist for domain {domain_name!r} given, but that domain is not evaluated "
                                 f"(domains: {', '.join(sorted(names))})")
    everyone: list[str] = []
    for m in [*models, *([base] if base else []), *specialists.values()]:
        if m not in everyone:
            everyone.append(m)
    for m in everyone:
        _check_model(m)

    # Plan every benchmark before loading any model: a data or configuration problem stops the run at once.
    plans = [plan_benchmark(d, b, options) for d in resolved for b in d.benchmarks]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for model in everyone:
        folder = out / model_key(model)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(folder / "model.json", {"model": model})
        if options.progress:
            print(f"{model}:", file=sys.stderr)
        holder: dict[str, Any] = {}

        def get_backend(model=model, holder=holder):
            if "backend" not in holder:
                holder["backend"] = open_backend(options.backend, model, progress=options.progress,
                                                 **options.backend_options)
            return holder["backend"]

        metrics: dict[str, dict] = {}
        try:
            for plan in plans:
                got = run_benchmark(plan, folder / plan.domain / f"{plan.name}.jsonl", get_backend, progress=options.progress)
                metrics.setdefault(plan.domain, {})[plan.name] = {
                    "metrics": {k: v.as_dict() for k, v in got.items()}, "headline": plan.headline,
                    "weight": plan.benchmark.get("weight", 1), "origin": plan.origin, "evaluator": plan.evaluator_name,
                }
        finally:
            if "backend" in holder:
                holder["backend"].close()
        _write_json_atomic(folder / "metrics.json", _clean({"model": model, "domains": metrics}))
        results[model] = metrics

    roles = {d.name: d.data.get("role", "capability") for d in resolved}
    summary = summarise(results, roles, base=base, specialists=specialists, models=list(models))
    _write_json_atomic(out / "summary.json", _clean(summary))
    write_text(out / "summary.md", format_table(summary) + "\n")
    return summary


def _check_model(model: str) -> None:
    path = Path(model)
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise MergeplugError(f"model {model}: no config.json in that folder; give a Hugging Face model folder")
        return
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local:
        raise MergeplugError(f"model {model}: no such folder (and not a hub id of the form owner/name)")


def domain_score(benchmarks: dict[str, dict]) -> float:
    """Weighted mean of the benchmarks' headline metrics."""
    total = weight = 0.0
    for entry in benchmarks.values():
        value = entry["metrics"].get(entry["headline"], {}).get("value")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        total += entry["weight"] * value
        weight += entry["weight"]
    return total / weight if weight else math.nan


def normalised_performance(score: float | None, specialist_score: float | None) -> float | None:
    """A model's domain score over the domain specialist's (same base, same benchmarks), as MergeBench
    (arXiv:2505.10833) normalises; None when either score is missing or NaN, or the specialist scored 0."""
    if score is None or specialist_score is None or math.isnan(score) or math.isnan(specialist_score):
        return None
    if not specialist_score:
        return None
    return score / specialist_score


def forgetting(base_values: Sequence[float | None],
               model_values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(relative, absolute) forgetting of a model against its base over paired benchmark values.

    ``base_values[i]`` and ``model_values[i]`` are the same benchmark's headline value (base-ability domains).
    Absolute = mean of (base - model) over the pairs where both are known; relative = mean of
    (base - model) / base over those pairs whose base value is non-zero. MergeBench (arXiv:2505.10833) does
    not publish its formula: the relative drop is our choice, the absolute drop is reported beside it.
    Either is None when no pair qualifies.
    """
    if len(base_values) != len(model_values):
        raise MergeplugError(f"forgetting: {len(base_values)} base values but {len(model_values)} model values; "
                             "pair them benchmark by benchmark")
    drops, relative = [], []
    for theirs, mine in zip(base_values, model_values):
        if mine is None or theirs is None:
            continue
        drops.append(theirs - mine)
        if theirs:
            relative.append((theirs - mine) / theirs)
    return (sum(relative) / len(relative) if relative else None,
            sum(drops) / len(drops) if drops else None)


def summarise(results: dict[str, dict], roles: dict[str, str], *, base: str | None,
              specialists: dict[str, str], models: list[str]) -> dict:
    scores = {m: {d: domain_score(b) for d, b in per.items()} for m, per in results.items()}
    summary: dict[str, Any] = {"models": {}, "domains": roles, "base": base, "specialists": specialists}
    for model, per in results.items():
        entry: dict[str, Any] = {"domain_scores": scores[model], "benchmarks": {
            f"{d}/{b}": v["metrics"].get(v["headline"], {}).get("value") for d, bs in per.items() for b, v in bs.items()
        }}
        normalised = {}
        for domain, specialist in specialists.items():
            ratio = normalised_performance(scores[model].get(domain), scores[specialist].get(domain))
            if ratio is not None:
                normalised[domain] = ratio
        if normalised:
            entry["normalised"] = normalised
            entry["normalised_mean"] = sum(normalised.values()) / len(normalised)
        if base and model != base:
            base_values, model_values = [], []
            for domain, role in roles.items():
                if role != "base_ability":
                    continue
                for b, v in per.get(domain, {}).items():
                    ref_entry = results[base][domain][b]
                    model_values.append(v["metrics"].get(v["headline"], {}).get("value"))
                    base_values.append(ref_entry["metrics"].get(ref_entry["headline"], {}).get("value"))
            relative, absolute = forgetting(base_values, model_values)
            if absolute is not None:
                entry["forgetting_absolute"] = absolute
            if relative is not None:
                entry["forgetting"] = relative
        entry["role"] = ("base" if model == base else
                         "specialist" if model in specialists.values() and model not in models else "evaluated")
        summary["models"][model] = entry
    return summary


def format_table(summary: dict) -> str:
    """A Markdown table: one row per model, one column per domain, then the comparisons."""
    domains = list(summary["domains"])
    has_norm = any("normalised_mean" in e for e in summary["models"].values())
    has_forget = any("forgetting" in e for e in summary["models"].values())
    head = ["model", *domains] + (["normalised"] if has_norm else []) + (["forgetting"] if has_forget else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for model, e in summary["models"].items():
        cells = [_short(model) + ("" if e["role"] == "evaluated" else f" ({e['role']})")]
        cells += [_fmt(e["domain_scores"].get(d)) for d in domains]
        if has_norm:
            cells.append(_fmt(e.get("normalised_mean")))
        if has_forget:
            cells.append(_fmt(e.get("forgetting")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(model: str) -> str:
    """A local folder by its name (the full path is in summary.json), a hub id as it is."""
    name = Path(model.rstrip("/")).name if Path(model).exists() else model
    return name if len(name) <= 48 else "…" + name[-47:]


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}"
