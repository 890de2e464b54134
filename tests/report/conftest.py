"""A hand-made bench results file with two bases, a failed and a skipped step, a model missing a domain, a
replaced line, and a PNG decoder for the plots.

Numbers (domain scores; ``general`` is the base-ability domain, its benchmarks facts and trivia):

base alpha   model              arith  code   facts  trivia
             alpha (base)       0.2    0.1    0.8    0.4
             alpha/arith (spec) 0.8    0.1    0.6    0.4
             alpha/code (spec)  0.2    0.5    0.8    0.2
             alpha/multitask    0.7    0.45   0.7    0.3
             ties density=0.2   0.6    0.4    0.4    0.4     (an earlier line said arith 0.1: replaced)
             linear weight=0.5  0.4    0.5    0.8    0.3
             dare p=0.9         0.7    -      0.8    0.4     (no code score)
base beta    beta (base)        0.5    0.5    0.5    0.5
             beta/arith (spec)  1.0    0.5    0.5    0.5
             beta/code (spec)   0.5    0.25   0.5    0.5
             ties density=0.2   0.5    0.25   0.25   0.5     (same label as alpha's merge)
"""
from __future__ import annotations

import json

import pytest

from mergeplug import plugins
from mergeplug.plugins import Registry

DOMAINS = {"arith": "capability", "code": "synthetic", "general": "base_ability"}
#: (base, model, role, method, parameters, specialist domain, {domain: score or {benchmark: value}})
MODELS = [
    ("alpha", "alpha", "base", None, {}, None, {"arith": 0.2, "code": 0.1, "general": {"facts": 0.8, "trivia": 0.4}}),
    ("alpha", "alpha/arith", "specialist", "full", {"learning_rate": 2e-5}, "arith",
     {"arith": 0.8, "code": 0.1, "general": {"facts": 0.6, "trivia": 0.4}}),
    ("alpha", "alpha/code", "specialist", "full", {}, "code",
     {"arith": 0.2, "code": 0.5, "general": {"facts": 0.8, "trivia": 0.2}}),
    ("alpha", "alpha/multitask", "multitask", "full", {}, None,
     {"arith": 0.7, "code": 0.45, "general": {"facts": 0.7, "trivia": 0.3}}),
    ("alpha", "ties density=0.2", "merged", "ties", {"density": 0.2, "scaling": 1.0}, None,
     {"arith": 0.6, "code": 0.4, "general": {"facts": 0.4, "trivia": 0.4}}),
    ("alpha", "linear weight=0.5", "merged", "linear", {"weight": 0.5}, None,
     {"arith": 0.4, "code": 0.5, "general": {"facts": 0.8, "trivia": 0.3}}),
    ("alpha", "dare p=0.9", "merged", "dare", {"p": 0.9}, None,
     {"arith": 0.7, "general": {"facts": 0.8, "trivia": 0.4}}),
    ("beta", "beta", "base", None, {}, None, {"arith": 0.5, "code": 0.5, "general": {"facts": 0.5, "trivia": 0.5}}),
    ("beta", "beta/arith", "specialist", "full", {}, "arith",
     {"arith": 1.0, "code": 0.5, "general": {"facts": 0.5, "trivia": 0.5}}),
    ("beta", "beta/code", "specialist", "full", {}, "code",
     {"arith": 0.5, "code": 0.25, "general": {"facts": 0.5, "trivia": 0.5}}),
    ("beta", "ties density=0.2", "merged", "ties", {"density": 0.2, "scaling": 1.0}, None,
     {"arith": 0.5, "code": 0.25, "general": {"facts": 0.25, "trivia": 0.5}}),
]


def step(id_, kind, model, base, status="ok", seconds=None, memory=None, error=None, label=None):
    return {"type": "step", "id": id_, "kind": kind, "label": label or f"{kind} {model}", "status": status,
            "error": error, "seconds": seconds, "peak_memory_mib": memory, "model": model, "base": base}


def score_rows(models=MODELS, domains=DOMAINS):
    rows = []
    for base, model, role, method, parameters, special, scores in models:
        for domain, value in scores.items():
            if domain not in domains:
                continue
            if isinstance(value, dict):
                benchmarks = {name: {"metric": "acc", "value": v, "stderr": 0.01} for name, v in value.items()}
                score = sum(value.values()) / len(value)
            else:
                benchmarks = {f"{domain}_test": {"metric": "exact_match", "value": value, "stderr": 0.05}}
                score = value
            rows.append({"type": "score", "model": model, "role": role, "base": base, "method": method,
                         "parameters": parameters, "domain": domain, "domain_role": domains[domain],
                         "specialist_domain": special, "score": score, "benchmarks": benchmarks})
    return rows


def step_rows():
    return [
        step("merge-ties-a", "merge", "ties density=0.2", "alpha", status="running"),  # replaced below
        step("base-a", "base", "alpha", "alpha", seconds=5.0, memory=300.0),
        step("ft-a-arith", "finetune", "alpha/arith", "alpha", seconds=10.0, memory=500.0),
        step("ft-a-code", "finetune", "alpha/code", "alpha", seconds=12.0, memory=520.0),
        step("ft-a-multi", "finetune", "alpha/multitask", "alpha", seconds=20.0, memory=510.0),
        step("merge-ties-a", "merge", "ties density=0.2", "alpha", seconds=2.0, memory=100.0),
        step("merge-linear-a", "merge", "linear weight=0.5", "alpha", seconds=0.5, memory=80.0),
        step("merge-dare-a", "merge", "dare p=0.9", "alpha", seconds=1.0, memory=120.0),
        step("merge-broken-a", "merge", "broken", "alpha", status="failed", seconds=0.25,
             error="RuntimeError: shapes differ\n  at tensor model.layers.0.mlp.up_proj.weight"),
        step("eval-broken-a", "evaluate", "broken", "alpha", status="skipped", error="needs failed step merge-broken-a"),
        step("eval-ties-a", "evaluate", "ties density=0.2", "alpha", seconds=4.0, memory=200.0),
        step("eval-linear-a-1", "evaluate", "linear weight=0.5", "alpha", seconds=1.0, memory=150.0),
        step("eval-linear-a-2", "evaluate", "linear weight=0.5", "alpha", seconds=2.0, memory=160.0),
        step("merge-ties-b", "merge", "ties density=0.2", "beta", seconds=3.0, memory=90.0),
    ]


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def results_file(tmp_path):
    """``tmp_path/bench/results.jsonl`` in the bench's format (an early ties arith line replaced later)."""
    folder = tmp_path / "bench"
    folder.mkdir()
    early = dict(score_rows()[0], model="ties density=0.2", role="merged", method="ties", base="alpha", score=0.1,
                 specialist_domain=None, parameters={"density": 0.2, "scaling": 1.0})
    return write_lines(folder / "results.jsonl", [early, *step_rows(), *score_rows()])


@pytest.fixture
def quiet_registry():
    """No plugins at all: the CLI's broken-plugin warnings stay out of the output."""
    previous = plugins.set_registry(Registry(entry_points=[], plugins=[]))
    yield
    plugins.set_registry(previous)
