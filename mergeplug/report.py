"""``mergeplug report``: a bench's results as a Markdown report, a self-contained HTML page and PNG plots.

Input: a bench's ``results.jsonl`` (or the bench folder holding it), one JSON object per line:

- ``{"type": "step", "id", "kind", "label", "status", "error", "seconds", "peak_memory_mib", "model", "base"?}``:
  one per step of the bench (kind ``base``, ``finetune``, ``merge``, ``evaluate``; status ``ok``, ``failed``,
  ``skipped``, or ``pending``/``running`` in an interrupted bench); ``model`` is the label of the model the step
  made or evaluated;
- ``{"type": "score", "model", "role", "base", "method", "parameters", "domain", "domain_role",
  "specialist_domain", "score", "benchmarks"}``: a model's score on a domain (role ``base``, ``specialist``,
  ``multitask`` or ``merged``; domain role ``capability``, ``synthetic`` or ``base_ability``).

A later line for the same step id, or the same (base, model, domain), replaces an earlier one.

What the report computes, as MergeBench defines it (arXiv:2505.10833), for every model against the specialists
and the base of ITS base model (several bases are kept apart):

- normalised performance on a capability (or synthetic) domain = the model's domain score / the score of that
  base's specialist for the domain (:func:`mergeplug.evaluate_models.normalised_performance`); its mean over the
  capability domains that have a specialist. A model missing a domain gets the mean over the domains it has,
  marked incomplete and left out of the ranking;
- forgetting = the base's value minus the model's, relative to the base's, averaged over the benchmarks of the
  ``base_ability`` domains, and the absolute drop beside it (:func:`mergeplug.evaluate_models.forgetting`); "n/a"
  with a note when no base-ability domain was evaluated;
- merge cost = the seconds and peak memory of the merge step that made the model, and its evaluation's seconds
  separately (MergeBench reports merge time and validation time apart).

The best value of each column stands out (bold in Markdown, a highlighted cell in HTML): the highest, except for
forgetting, seconds and memory (the lowest); a column is ranked only when it holds two or more different values.
Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .atomic import write_bytes
from .errors import MergeplugError
from .evaluate_models import forgetting, normalised_performance

RESULTS_FILE = "results.jsonl"
ROLES = ("base", "specialist", "multitask", "merged")
DOMAIN_ROLES = ("capability", "synthetic", "base_ability")
#: Domain roles that count as capabilities (normalised performance); ``base_ability`` is for forgetting.
CAPABILITY_ROLES = ("capability", "synthetic")
STEP_STATUSES = ("ok", "failed", "skipped", "pending", "running")
STEP_KINDS = ("base", "finetune", "merge", "evaluate")
#: Steps that make a model (their cost is the model's cost).
MAKING_KINDS = ("base", "finetune", "merge")
#: Bar colours by role: the base grey, specialists orange, the multi-task baseline green, merges blue (tab10).
ROLE_COLOURS = {"base": (127, 127, 127), "specialist": (255, 127, 14), "multitask": (44, 160, 44),
                "merged": (31, 119, 180)}
SCATTER_FILE = "normalised_vs_cost.png"


# --- reading ----------------------------------------------------------------------------------------------
@dataclass
class Results:
    """The latest step line per step id and score line per (base, model, domain), in order of first appearance."""

    source: Path
    steps: dict[str, dict] = field(default_factory=dict)
    scores: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_results(path: str | Path) -> Results:
    """Read a bench's ``results.jsonl`` (``path`` is the file or the bench folder holding it).

    A problem is one line naming the file and line number. An unparsable last line without its newline is an
    interrupted write: it is left out with a note, not an error.
    """
    given = Path(path)
    file = given / RESULTS_FILE if given.is_dir() else given
    if not file.is_file():
        where = f"folder {given} has no {RESULTS_FILE}" if given.is_dir() else f"{given}: no such file"
        raise MergeplugError(f"results {where}; give a bench's {RESULTS_FILE} or the bench folder (mergeplug bench -o DIR)")
    text = file.read_text(encoding="utf-8")
    lines = text.split("\n")
    results = Results(file)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                results.notes.append(f"{file.name} line {number}: an incomplete last line (an interrupted write) "
                                     "was left out")
                continue
            raise MergeplugError(f"{file} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        where = f"{file} line {number}"
        if not isinstance(row, dict):
            raise MergeplugError(f"{where}: expected a JSON object, got {type(row).__name__}")
        kind = row.get("type")
        if kind == "step":
            step = _check_step(row, where)
            results.steps[step["id"]] = step
        elif kind == "score":
            score = _check_score(row, where)
            results.scores[(score["base"], score["model"], score["domain"])] = score
        else:
            raise MergeplugError(f"{where}: unknown \"type\" {kind!r}; every line is a \"step\" or a \"score\"")
    if not results.steps and not results.scores:
        raise MergeplugError(f"{file}: no results in it yet (run or resume the bench first)")
    return results


def _text_field(row: dict, key: str, where: str, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise MergeplugError(f"{where}: \"{key}\" must be a non-empty string, got {json.dumps(value)}")
    return value


def _number_field(row: dict, key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeplugError(f"{where}: \"{key}\" must be a number or null, got {json.dumps(value)}")
    return float(value) if math.isfinite(value) else None


def _check_step(row: dict, where: str) -> dict:
    step = dict(row)
    step["id"] = _text_field(row, "id", where)
    step["kind"] = _text_field(row, "kind", where)
    step["label"] = _text_field(row, "label", where, required=False) or step["id"]
    status = row.get("status")
    if status not in STEP_STATUSES:
        raise MergeplugError(f"{where}: step {step['id']}: \"status\" {json.dumps(status)} is not one of "
                             f"{', '.join(STEP_STATUSES)}")
    step["model"] = _text_field(row, "model", where, required=False)
    step["base"] = _text_field(row, "base", where, required=False)
    step["seconds"] = _number_field(row, "seconds", where)
    step["peak_memory_mib"] = _number_field(row, "peak_memory_mib", where)
    error = row.get("error")
    step["error"] = None if error is None else " ".join(str(error).split())
    return step


def _check_score(row: dict, where: str) -> dict:
    score = dict(row)
    score["model"] = _text_field(row, "model", where)
    score["domain"] = _text_field(row, "domain", where)
    if row.get("role") not in ROLES:
        raise MergeplugError(f"{where}: model {score['model']}: \"role\" {json.dumps(row.get('role'))} is not one of "
                             f"{', '.join(ROLES)}")
    role = row.get("domain_role") or "capability"
    if role not in DOMAIN_ROLES:
        raise MergeplugError(f"{where}: domain {score['domain']}: \"domain_role\" {json.dumps(role)} is not one of "
                             f"{', '.join(DOMAIN_ROLES)}")
    score["domain_role"] = role
    # The base model's own rows may leave "base" out: a base is its own base.
    given_base = _text_field(row, "base", where, required=False)
    score["base"] = given_base or (score["model"] if row["role"] == "base" else "(base not given)")
    score["method"] = row.get("method")
    score["parameters"] = row.get("parameters") or {}
    if not isinstance(score["parameters"], dict):
        raise MergeplugError(f"{where}: model {score['model']}: \"parameters\" must be an object")
    score["specialist_domain"] = row.get("specialist_domain")
    if row["role"] == "specialist" and not isinstance(score["specialist_domain"], str):
        raise MergeplugError(f"{where}: specialist {score['model']}: \"specialist_domain\" must name the domain it "
                             "was trained for")
    score["score"] = _number_field(row, "score", where)
    benchmarks = row.get("benchmarks") or {}
    if not isinstance(benchmarks, dict):
        raise MergeplugError(f"{where}: model {score['model']}: \"benchmarks\" must be an object")
    values = {}
    for name, entry in benchmarks.items():
        entry = entry if isinstance(entry, dict) else {"value": entry}
        values[name] = _number_field(entry, "value", f"{where}: benchmark {name}")
    score["benchmark_values"] = values
    return score


# --- computing --------------------------------------------------------------------------------------------
def compute(results: Results) -> dict:
    """Every number of the report, as a JSON-able dict (written beside the report as ``report.json``)."""
    notes = list(results.notes)
    domain_roles: dict[str, str] = {}
    for score in results.scores.values():
        if domain_roles.setdefault(score["domain"], score["domain_role"]) != score["domain_role"]:
            notes.append(f"domain {score['domain']}: rows disagree on its role; {domain_roles[score['domain']]} kept")
    domains = ([d for d, r in domain_roles.items() if r in CAPABILITY_ROLES]
               + [d for d, r in domain_roles.items() if r == "base_ability"])
    capability = [d for d in domains if domain_roles[d] in CAPABILITY_ROLES]
    base_ability = [d for d in domains if domain_roles[d] == "base_ability"]

    models: dict[tuple[str, str], dict] = {}
    for score in results.scores.values():
        key = (score["base"], score["model"])
        entry = models.setdefault(key, {
            "label": score["model"], "base": score["base"], "role": score["role"], "method": score["method"],
            "parameters": score["parameters"], "specialist_domain": score["specialist_domain"],
            "scores": {}, "benchmarks": {},
        })
        entry["scores"][score["domain"]] = score["score"]
        entry["benchmarks"][score["domain"]] = score["benchmark_values"]
    bases = list(dict.fromkeys(base for base, _ in models))

    specialists: dict[str, dict[str, str]] = {base: {} for base in bases}
    for (base, label), entry in models.items():
        if entry["role"] != "specialist":
            continue
        domain = entry["specialist_domain"]
        if domain in specialists[base]:
            notes.append(f"base {base}: several specialists for domain {domain}; {label} is the reference")
        specialists[base][domain] = label
    # Domains where a base's models can be normalised: its specialist has a known, non-zero score there.
    usable: dict[str, list[str]] = {}
    for base in bases:
        lacking = [d for d in capability if d not in specialists[base]]
        if lacking:
            notes.append(f"base {base}: no specialist for {', '.join(lacking)}: no normalised performance there")
        usable[base] = []
        for domain in (d for d in capability if d in specialists[base]):
            reference = models[(base, specialists[base][domain])]["scores"].get(domain)
            if normalised_performance(1.0, reference) is None:
                notes.append(f"base {base}: specialist {specialists[base][domain]} scored "
                             f"{'nothing' if reference is None else _fmt(reference)} on {domain}: no normalised "
                             "performance there (it would divide by that score)")
            else:
                usable[base].append(domain)

    forgetting_status = "ok"
    forgetting_note = None
    if not base_ability:
        forgetting_status = "n/a"
        forgetting_note = ("n/a: no base_ability domain was evaluated; forgetting compares a model with its base on "
                           "such domains (add one to the bench's base abilities)")
    base_rows = {base: next((e for (b, _), e in models.items() if b == base and e["role"] == "base"), None)
                 for base in bases}
    for base in bases:
        if base_ability and base_rows[base] is None:
            notes.append(f"base {base}: the base model has no scores: no forgetting for its models")

    for (base, label), entry in models.items():
        ratios = {}
        wanted = usable[base]
        for domain in wanted:
            reference = models[(base, specialists[base][domain])]["scores"].get(domain)
            ratio = normalised_performance(entry["scores"].get(domain), reference)
            if ratio is not None:
                ratios[domain] = ratio
        entry["normalised"] = ratios
        entry["normalised_mean"] = sum(ratios.values()) / len(ratios) if ratios else None
        entry["normalised_complete"] = bool(wanted) and len(ratios) == len(wanted)
        missing = [d for d in domains if entry["scores"].get(d) is None]
        entry["missing_domains"] = missing
        if missing:
            notes.append(f"{_who(entry, bases)}: no score for {', '.join(missing)}"
                         + (f"; its normalised mean covers {len(ratios)} of {len(wanted)} domains and is not ranked"
                            if ratios and wanted and len(ratios) < len(wanted) else ""))
        entry["forgetting"] = None
        reference = base_rows.get(base)
        if base_ability and reference is not None and entry["role"] != "base":
            base_values, model_values = _paired_base_ability(reference, entry, base_ability)
            relative, absolute = forgetting(base_values, model_values)
            if relative is not None or absolute is not None:
                entry["forgetting"] = {"relative": relative, "absolute": absolute,
                                       "pairs": sum(a is not None and b is not None
                                                    for a, b in zip(base_values, model_values))}

    _attach_costs(results, models, bases, notes)
    ordered = sorted(models.values(), key=lambda e: (bases.index(e["base"]), ROLES.index(e["role"]),
                                                     _specialist_order(e, domains)))
    return {
        "source": str(results.source),
        "domains": [{"name": d, "role": domain_roles[d]} for d in domains],
        "capability_domains": capability,
        "base_ability_domains": base_ability,
        "bases": bases,
        "specialists": specialists,
        "normalised_domains": usable,
        "models": ordered,
        "methods": _methods(ordered, bases),
        "forgetting_status": forgetting_status,
        "forgetting_note": forgetting_note,
        "runtime": _runtime(results),
        "problems": [{"id": s["id"], "kind": s["kind"], "label": s["label"], "status": s["status"],
                      "error": s["error"]} for s in results.steps.values() if s["status"] not in ("ok",)],
        "steps": _step_counts(results),
        "notes": notes,
    }


def _step_counts(results: Results) -> dict[str, int]:
    """Steps per status: ok, failed and skipped always, pending and running when an interrupted bench has any."""
    counts = {status: sum(s["status"] == status for s in results.steps.values()) for status in STEP_STATUSES}
    return {status: n for status, n in counts.items() if n or status in ("ok", "failed", "skipped")}


def _who(entry: dict, bases: Sequence[str]) -> str:
    return f"model {entry['label']}" + (f" (base {entry['base']})" if len(bases) > 1 else "")


def _specialist_order(entry: dict, domains: list[str]) -> int:
    domain = entry.get("specialist_domain")
    return domains.index(domain) if entry["role"] == "specialist" and domain in domains else len(domains)


def _paired_base_ability(reference: dict, entry: dict, base_ability: Sequence[str]):
    """The base's and the model's values, benchmark by benchmark (the domain score where a side has no
    per-benchmark values)."""
    base_values, model_values = [], []
    for domain in base_ability:
        theirs, mine = reference["benchmarks"].get(domain) or {}, entry["benchmarks"].get(domain) or {}
        if theirs and mine:
            for name, value in mine.items():
                model_values.append(value)
                base_values.append(theirs.get(name))
        elif domain in entry["scores"] or domain in reference["scores"]:
            model_values.append(entry["scores"].get(domain))
            base_values.append(reference["scores"].get(domain))
    return base_values, model_values


def _attach_costs(results: Results, models: dict, bases: list[str], notes: list[str]) -> None:
    """The step that made each model (its seconds and peak memory) and the seconds of its evaluation steps.

    A step names its model by ``model`` (else ``label``) and, when several bases share a label, by ``base``."""
    shared = {label for _, label in models if sum(1 for _, other in models if other == label) > 1}
    for (base, label), entry in models.items():
        def names(step: dict) -> bool:
            if (step.get("model") or step["label"]) != label:
                return False
            return step.get("base") in (None, base) and (step.get("base") is not None or label not in shared)

        made = [s for s in results.steps.values() if s["kind"] in MAKING_KINDS and names(s)]
        evaluated = [s for s in results.steps.values() if s["kind"] == "evaluate" and names(s)]
        step = made[-1] if made else None
        entry["made_by"] = None if step is None else {
            "id": step["id"], "kind": step["kind"], "status": step["status"], "seconds": step["seconds"],
            "peak_memory_mib": step["peak_memory_mib"]}
        seconds = [s["seconds"] for s in evaluated if s["seconds"] is not None]
        memory = [s["peak_memory_mib"] for s in evaluated if s["peak_memory_mib"] is not None]
        entry["evaluate"] = None if not evaluated else {
            "steps": len(evaluated), "seconds": sum(seconds) if seconds else None,
            "peak_memory_mib": max(memory) if memory else None}
        if entry["role"] == "merged" and step is None:
            notes.append(f"{_who(entry, bases)}: no merge step names it (a step's \"model\" must equal the score "
                         "rows' \"model\"): its merge cost is unknown")


def _methods(models: list[dict], bases: list[str]) -> list[dict]:
    """Per base and merge method: how many settings ran, the best complete setting and its normalised mean."""
    out = []
    for base in bases:
        by_method: dict[str, list[dict]] = {}
        for entry in models:
            if entry["base"] == base and entry["role"] == "merged":
                by_method.setdefault(str(entry["method"]), []).append(entry)
        for method, entries in by_method.items():
            ranked = [e for e in entries if e["normalised_complete"] and e["normalised_mean"] is not None]
            best = max(ranked, key=lambda e: e["normalised_mean"]) if ranked else None
            means = [e["normalised_mean"] for e in ranked]
            out.append({"base": base, "method": method, "settings": len(entries), "ranked": len(ranked),
                        "best": best["label"] if best else None,
                        "best_parameters": best["parameters"] if best else None,
                        "best_normalised_mean": best["normalised_mean"] if best else None,
                        "mean_over_settings": sum(means) / len(means) if means else None,
                        "best_merge_seconds": (best.get("made_by") or {}).get("seconds") if best else None})
    return out


def _runtime(results: Results) -> list[dict]:
    kinds = list(dict.fromkeys([*[k for k in STEP_KINDS if any(s["kind"] == k for s in results.steps.values())],
                                *(s["kind"] for s in results.steps.values())]))
    out = []
    for kind in kinds:
        steps = [s for s in results.steps.values() if s["kind"] == kind]
        # Failed steps spent their time too: every step that reports seconds counts.
        seconds = [s["seconds"] for s in steps if s["seconds"] is not None]
        memory = [s["peak_memory_mib"] for s in steps if s["peak_memory_mib"] is not None]
        out.append({"kind": kind, "steps": len(steps),
                    **{status: sum(s["status"] == status for s in steps) for status in ("ok", "failed", "skipped")},
                    "seconds_total": sum(seconds) if seconds else None,
                    "seconds_mean": sum(seconds) / len(seconds) if seconds else None,
                    "seconds_max": max(seconds) if seconds else None,
                    "peak_memory_mib_max": max(memory) if memory else None})
    return out


# --- tables -----------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """A table cell: its text, and the number it ranks by (None: not ranked)."""

    text: str
    number: float | None = None


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    #: Per column: "high" (the highest is best), "low" (the lowest is best) or None (not ranked).
    better: list[str | None]

    def best(self) -> set[tuple[int, int]]:
        """(row, column) of each column's best value; ties are all best; a column is ranked only when it holds
        two or more different values."""
        marked = set()
        for col, direction in enumerate(self.better):
            if direction is None:
                continue
            numbers = [(r, row[col].number) for r, row in enumerate(self.rows) if row[col].number is not None]
            values = [n for _, n in numbers]
            if len(numbers) < 2 or max(values) == min(values):  # nothing to tell apart
                continue
            target = (max if direction == "high" else min)(values)
            marked |= {(r, col) for r, n in numbers if math.isclose(n, target, rel_tol=1e-12, abs_tol=1e-15)}
        return marked


def _fmt(value: float | None, kind: str = "score") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind == "seconds":
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if kind == "mib":
        return f"{value:.0f}"
    return f"{value:.3f}"


def _num(value: float | None, kind: str = "score", *, ranked: bool = True) -> Cell:
    return Cell(_fmt(value, kind), value if ranked and value is not None else None)


def _parameters(parameters: dict | None) -> str:
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                     for k, v in (parameters or {}).items())


def score_tables(report: dict) -> list[tuple[str | None, Table]]:
    """The main table, one per base: every model's domain scores (rows grouped by role), its normalised mean and
    its relative forgetting."""
    out = []
    domains = report["domains"]
    with_forgetting = report["forgetting_status"] == "ok"
    for base in report["bases"]:
        headers = ["model", "role", "method",
                   *(d["name"] + (" (base ability)" if d["role"] == "base_ability" else "") for d in domains),
                   "normalised (mean)"] + (["forgetting (relative)"] if with_forgetting else [])
        better = [None, None, None, *("high" for _ in domains), "high"] + (["low"] if with_forgetting else [])
        rows = []
        for e in (m for m in report["models"] if m["base"] == base):
            mean = _num(e["normalised_mean"], ranked=e["normalised_complete"])
            if e["normalised_mean"] is not None and not e["normalised_complete"]:
                mean.text += " *"
            row = [Cell(e["label"]), Cell(e["role"]), Cell(str(e["method"] or "–")),
                   *(_num(e["scores"].get(d["name"])) for d in domains), mean]
            if with_forgetting:
                row.append(_num((e["forgetting"] or {}).get("relative")) if e["role"] != "base" else Cell("–"))
            rows.append(row)
        out.append((base if len(report["bases"]) > 1 else None, Table(headers, rows, better)))
    return out


def method_tables(report: dict) -> list[tuple[str, str | None, Table]]:
    """Normalised performance per method: the best setting of each method, then every merge per domain."""
    out = []
    capability = report["capability_domains"]
    several = len(report["bases"]) > 1
    for base in report["bases"]:
        suffix = f" (base {base})" if several else ""
        methods = [m for m in report["methods"] if m["base"] == base]
        reference = [e for e in report["models"] if e["base"] == base and e["role"] == "multitask"]
        if methods:
            rows = [[Cell(m["method"]), Cell(str(m["settings"])), Cell(m["best"] or "–"),
                     Cell(_parameters(m["best_parameters"]) or "–"), _num(m["best_normalised_mean"]),
                     _num(m["mean_over_settings"]), _num(m["best_merge_seconds"], "seconds")] for m in methods]
            rows += [[Cell(f"({e['role']}: {e['label']})"), Cell("–"), Cell("–"), Cell("–"),
                      _num(e["normalised_mean"], ranked=False), Cell("–"), Cell("–")] for e in reference]
            out.append(("Best setting per method" + suffix, None, Table(
                ["method", "settings", "best setting", "parameters", "normalised (best)", "normalised (mean of settings)",
                 "merge s (best)"], rows, [None, None, None, None, "high", "high", "low"])))
        merges = [e for e in report["models"] if e["base"] == base and e["role"] in ("merged", "multitask")]
        if merges:
            rows = []
            for e in merges:
                mean = _num(e["normalised_mean"], ranked=e["normalised_complete"] and e["role"] == "merged")
                if e["normalised_mean"] is not None and not e["normalised_complete"]:
                    mean.text += " *"
                rows.append([Cell(e["label"]), Cell(str(e["method"] or "–")), Cell(_parameters(e["parameters"]) or "–"),
                             *(_num(e["normalised"].get(d), ranked=e["role"] == "merged") for d in capability), mean,
                             Cell(f"{len(e['normalised'])}/{len(report['normalised_domains'][base])}")])
            out.append(("Every merge" + suffix, "normalised performance per capability domain (the multi-task "
                        "baseline for reference, not ranked)", Table(
                ["model", "method", "parameters", *capability, "mean", "domains"], rows,
                [None, None, None, *("high" for _ in capability), "high", None])))
    return out


def forgetting_tables(report: dict) -> list[tuple[str | None, Table]]:
    out = []
    for base in report["bases"]:
        rows = [[Cell(e["label"]), Cell(e["role"]), _num((e["forgetting"] or {}).get("relative")),
                 _num((e["forgetting"] or {}).get("absolute")), Cell(str((e["forgetting"] or {}).get("pairs", 0)))]
                for e in report["models"] if e["base"] == base and e["role"] != "base"]
        if rows:
            out.append((base if len(report["bases"]) > 1 else None, Table(
                ["model", "role", "forgetting (relative)", "forgetting (absolute)", "benchmarks compared"], rows,
                [None, None, "low", "low", None])))
    return out


def runtime_table(report: dict) -> Table:
    rows = [[Cell(r["kind"]), Cell(str(r["steps"])), Cell(str(r["ok"])), Cell(str(r["failed"])),
             Cell(str(r["skipped"])), _num(r["seconds_total"], "seconds", ranked=False),
             _num(r["seconds_mean"], "seconds", ranked=False), _num(r["seconds_max"], "seconds", ranked=False),
             _num(r["peak_memory_mib_max"], "mib", ranked=False)] for r in report["runtime"]]
    return Table(["step kind", "steps", "ok", "failed", "skipped", "total s", "mean s", "max s", "peak MiB"], rows,
                 [None] * 9)


def merge_cost_tables(report: dict) -> list[tuple[str | None, Table]]:
    out = []
    for base in report["bases"]:
        rows = [[Cell(e["label"]), Cell(str(e["method"] or "–")),
                 _num((e["made_by"] or {}).get("seconds"), "seconds"),
                 _num((e["made_by"] or {}).get("peak_memory_mib"), "mib"),
                 _num((e["evaluate"] or {}).get("seconds"), "seconds")]
                for e in report["models"] if e["base"] == base and e["role"] == "merged"]
        if rows:
            out.append((base if len(report["bases"]) > 1 else None, Table(
                ["model", "method", "merge s", "merge peak MiB", "evaluate s"], rows, [None, None, "low", "low", "low"])))
    return out


def problems_table(report: dict) -> Table:
    rows = [[Cell(p["kind"]), Cell(p["label"]), Cell(p["status"]), Cell(p["error"] or "–")] for p in report["problems"]]
    return Table(["step kind", "step", "status", "error"], rows, [None] * 4)


# --- plots ------------------------------------------------------------------------------------------------
def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "domain"


def draw_plots(report: dict, folder: Path) -> dict[str, Any]:
    """Per domain a bar chart of every model's score (grouped by base, coloured by role); the normalised mean of
    every merge against its merge seconds. Returns {file name: plotting.Plot}."""
    from .plotting import grouped_bar_chart, scatter_plot

    plots: dict[str, Any] = {}
    used: set[str] = set()
    for domain in report["domains"]:
        name = f"scores_{_file_stem(domain['name'])}.png"
        while name in used:
            name = name[:-4] + "_.png"
        used.add(name)
        groups = [(base, [(e["label"], e["scores"].get(domain["name"]), e["role"])
                    for e in report["models"] if e["base"] == base])
                  for base in report["bases"]]
        role_text = " (base ability)" if domain["role"] == "base_ability" else ""
        plots[name] = grouped_bar_chart(groups, folder / name, title=f"{domain['name']}{role_text}: score per model",
                                        y_label="domain score",
                                        colours=ROLE_COLOURS)
    points = [((e["made_by"] or {}).get("seconds"), e["normalised_mean"],
               e["label"] + (f" ({e['base']})" if len(report["bases"]) > 1 else ""), str(e["method"]))
              for e in report["models"] if e["role"] == "merged" and e["normalised_complete"]]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if points:
        plots[SCATTER_FILE] = scatter_plot(points, folder / SCATTER_FILE,
                                           title="normalised performance against merge cost",
                                           x_label="merge seconds", y_label="normalised performance (mean)",
                                           max_label_chars=32)
    return plots


# --- writing ----------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What :func:`write_report` wrote; ``str()`` is the report's folder."""

    folder: Path
    markdown: Path
    html: Path
    json: Path
    plots: dict[str, Any]
    summary: dict

    def __str__(self) -> str:
        return str(self.folder)


EXPLANATION = (
    "Domain score: the weighted mean of the domain's benchmarks' headline metrics. Normalised performance: a "
    "model's domain score divided by the score of the specialist of its base for that domain, averaged over the "
    "capability domains (MergeBench, arXiv:2505.10833); * marks a mean over fewer domains (not ranked). "
    "Forgetting: (base - model) / base per benchmark of the base-ability domains, averaged (the absolute drop "
    "beside it); lower is better. Merge cost: the merge step's seconds and peak memory; evaluation time apart. "
    "The best value of each column is highlighted: the highest, the lowest for forgetting, time and memory."
)


def _blocks(report: dict, plots: dict[str, Any]) -> list[tuple]:
    """The report as a list of blocks, rendered to Markdown and HTML alike: ("h1"|"h2"|"h3"|"p", text),
    ("table", Table), ("ul", [text]), ("img", file name, caption)."""
    steps = report["steps"]
    capability = ", ".join(report["capability_domains"]) or "none"
    base_ability = ", ".join(report["base_ability_domains"]) or "none"
    blocks: list[tuple] = [
        ("h1", "mergeplug bench report"),
        ("p", f"Results: {report['source']}. {len(report['models'])} models on {len(report['domains'])} domains "
              f"(capability: {capability}; base ability: {base_ability}); base models: "
              f"{', '.join(report['bases']) or 'none'}. Steps: "
              + ", ".join(f"{n} {status}" for status, n in steps.items()) + "."),
        ("p", EXPLANATION),
        ("h2", "Scores per domain"),
    ]
    for base, table in score_tables(report):
        if base:
            blocks.append(("h3", f"Base {base}"))
        blocks.append(("table", table))
    blocks.append(("h2", "Normalised performance per method"))
    tables = method_tables(report)
    if not tables:
        blocks.append(("p", "No merged model was scored."))
    for title, caption, table in tables:
        blocks.append(("h3", title))
        if caption:
            blocks.append(("p", caption[0].upper() + caption[1:] + "."))
        blocks.append(("table", table))
    blocks.append(("h2", "Forgetting"))
    if report["forgetting_status"] != "ok":
        blocks.append(("p", "Forgetting: " + report["forgetting_note"] + "."))
    else:
        for base, table in forgetting_tables(report):
            if base:
                blocks.append(("h3", f"Base {base}"))
            blocks.append(("table", table))
    blocks += [("h2", "Runtime and memory"), ("h3", "Per step kind"), ("table", runtime_table(report))]
    for base, table in merge_cost_tables(report):
        blocks += [("h3", "Per merge" + (f" (base {base})" if base else "")), ("table", table)]
    blocks.append(("h2", "Failed and skipped steps"))
    if report["problems"]:
        blocks.append(("table", problems_table(report)))
    else:
        blocks.append(("p", "None: every step finished."))
    blocks.append(("h2", "Plots"))
    for name in plots:
        caption = ("Normalised performance (mean over every capability domain) of each merge against its merge "
                   "seconds, coloured by method."
                   if name == SCATTER_FILE else
                   f"Every model's score on {name[len('scores_'):-4]}, grouped by base, coloured by role.")
        blocks.append(("img", name, caption))
    if SCATTER_FILE not in plots:
        blocks.append(("p", "No scatter of normalised performance against merge cost: no merge has both a merge "
                            "time and a normalised mean over every capability domain."))
    if report["notes"]:
        blocks += [("h2", "Notes"), ("ul", report["notes"])]
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    best = table.best()
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
             "|" + "|".join("---" for _ in table.headers) + "|"]
    for r, row in enumerate(table.rows):
        cells = [f"**{_md_cell(c.text)}**" if (r, col) in best else _md_cell(c.text) for col, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(blocks: list[tuple]) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + block[1])
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            parts.append(markdown_table(block[1]))
        elif kind == "ul":
            parts.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "img":
            parts.append(f"![{block[1][:-4]}]({block[1]})\n\n*{block[2]}*")
    return "\n\n".join(parts) + "\n"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #c8ecc0; font-weight: bold; }
figure { margin: 1em 0 2em; } figcaption { color: #555; font-size: 0.9em; }
img { image-rendering: pixelated; max-width: 100%; border: 1px solid #eee; }
"""


def html_table(table: Table) -> str:
    best = table.best()
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr></thead>",
           "<tbody>"]
    for r, row in enumerate(table.rows):
        cells = []
        for col, cell in enumerate(row):
            classes = ["num"] if table.better[col] or _looks_numeric(cell.text) else []
            if (r, col) in best:
                classes.append("best")
            attribute = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attribute}>{html.escape(cell.text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[0-9.]+( \*)?|[0-9]+/[0-9]+", text))


def render_html(blocks: list[tuple], images: dict[str, bytes]) -> str:
    """One page: CSS inline and every PNG as a base64 data URI, so it opens offline with nothing beside it."""
    title = next((b[1] for b in blocks if b[0] == "h1"), "report")
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            parts.append(html_table(block[1]))
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(images[block[1]]).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block[2])}">'
                         f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_report(results: Results | str | Path, out: str | Path) -> Report:
    """Write ``report.md``, ``report.html`` (self-contained), ``report.json`` and the PNG plots into ``out``.

    ``results`` is a :class:`Results` or a path for :func:`load_results`.
    """
    if not isinstance(results, Results):
        results = load_results(results)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise MergeplugError(f"report output {folder} is a file; give a folder (-o DIR)")
    folder.mkdir(parents=True, exist_ok=True)
    summary = compute(results)
    plots = draw_plots(summary, folder)
    blocks = _blocks(summary, plots)
    images = {name: (folder / name).read_bytes() for name in plots}
    markdown, page, data = folder / "report.md", folder / "report.html", folder / "report.json"
    write_bytes(markdown, render_markdown(blocks).encode("utf-8"))
    write_bytes(page, render_html(blocks, images).encode("utf-8"))
    write_bytes(data, (json.dumps(summary, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))
    return Report(folder, markdown, page, data, plots, summary)


def main_table(summary: dict) -> str:
    """The per-domain score table(s) as Markdown, for the terminal."""
    parts = []
    for base, table in score_tables(summary):
        parts.append((f"base {base}:\n" if base else "") + markdown_table(table))
    return "\n\n".join(parts)
