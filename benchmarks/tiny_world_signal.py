"""Calibration of the tiny world: does each specialist beat the base on its own domain, and how long does it take?

Builds the tiny base (deliberately undertrained: one pass over the mixture of the five synthetic domains and the
base ability, tiny_reversal),
finetunes one specialist per domain and the multi-task baseline (all five) with the ``full`` finetuner, evaluates
base, specialists and baseline on all five domains (transformers backend), and prints the domain scores, each
specialist's gain over the base on its own domain with the gain's standard error, and the wall time of every
phase. The settings are :data:`mergeplug.tiny.TINY_DEFAULTS` (``--smaller``: :data:`mergeplug.tiny.TINY_SMALLER`,
a test-sized run that still makes every row); ``--set base.epochs=0.5`` overrides one (a JSON value).

    python benchmarks/tiny_world_signal.py -o /tmp/tiny-world           # about 5.5 minutes on 2 CPU cores
    python benchmarks/tiny_world_signal.py -o /tmp/tiny-world --merges  # and 4 merges, about 1 minute more
    python benchmarks/tiny_world_signal.py -o /tmp/tiny-small --smaller # about 25 seconds

The requirement it checks (exit status 1 when it fails; never with ``--smaller``): every specialist's own-domain
score exceeds the base's by more than ``--min-sigmas`` standard errors of the difference (3 by default; our
choice). ``--merges`` also merges the five specialists (linear, task arithmetic, TIES) and evaluates the merges,
timed apart from the total.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

#: The tiny world's domains and its base ability (the bench preset names the same ones): the base learns all six,
#: specialists and the multi-task baseline train on the five domains, every model is scored on all six.
DOMAINS = ("tiny_arithmetic", "tiny_functions", "tiny_formats", "tiny_translation", "tiny_refusal")
BASE_ABILITIES = ("tiny_reversal",)
EVALUATED = [*DOMAINS, *BASE_ABILITIES]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("tiny-world-signal"), help="working folder")
    parser.add_argument("--smaller", action="store_true", help="the test-sized settings (TINY_SMALLER)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
                        help="override one setting, e.g. base.epochs=0.5 or finetune.learning_rate=0.001")
    parser.add_argument("--min-sigmas", type=float, default=3.0, help="required gain in standard errors")
    parser.add_argument("--keep", action="store_true", help="reuse models already in --output (skip their training)")
    parser.add_argument("--merges", action="store_true",
                        help="also merge the specialists (linear, task arithmetic, TIES) and evaluate the merges; not "
                             "counted in the total")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    from mergeplug.tiny import TINY_DEFAULTS, TINY_SMALLER

    chosen = copy.deepcopy(TINY_SMALLER if args.smaller else TINY_DEFAULTS)
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in chosen or not name:
            raise SystemExit(f"--set {item}: use SECTION.KEY=VALUE with SECTION one of {', '.join(chosen)}")
        chosen[section][name] = json.loads(value)
    return chosen


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = parse_args(argv)
    config = settings(args)
    import torch

    torch.set_num_threads(config["runtime"]["torch_threads"])
    from mergeplug.evaluate_models import EvaluateOptions, evaluate_models
    from mergeplug.finetuning import finetune
    from mergeplug.tiny import build_tiny_base

    out = args.output.absolute()
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(config, indent=1), flush=True)
    times: dict[str, float] = {}

    def timed(label: str, folder: Path, make) -> Path:
        if args.keep and folder.is_dir():
            return folder
        start = time.perf_counter()
        make()
        times[label] = time.perf_counter() - start
        print(f"{label}: {times[label]:.1f} s", flush=True)
        return folder

    base = timed("base", out / "base", lambda: build_tiny_base(
        EVALUATED, out / "base", force=True, progress=False, offline=True, device="cpu", **config["base"]))
    models = {}
    for name in (*DOMAINS, "multitask"):
        domains = list(DOMAINS) if name == "multitask" else [name]
        models[name] = timed(f"finetune {name}", out / name, lambda d=domains, n=name: finetune(
            str(base), d, out / n, finetuner="full", parameters=config["finetune"], force=True, progress=False,
            offline=True, device="cpu"))

    evaluate = config["evaluate"]
    options = EvaluateOptions(backend=evaluate["backend"], backend_options=evaluate["backend_options"],
                              limit=evaluate.get("limit"), offline=True, progress=False)
    results = out / "evaluation"
    if not args.keep:
        shutil.rmtree(results, ignore_errors=True)
    everyone = {"base": base, **models}
    for name, model in everyone.items():
        start = time.perf_counter()
        evaluate_models([str(model)], EVALUATED, results, options)
        times[f"evaluate {name}"] = time.perf_counter() - start
        print(f"evaluate {name}: {times[f'evaluate {name}']:.1f} s", flush=True)
    merged = merge_specialists(out, base, models, results, options) if args.merges else {}
    summary = evaluate_models([str(m) for m in {**everyone, **merged}.values()], EVALUATED, results, options,
                              base=str(base), specialists={d: str(models[d]) for d in DOMAINS})
    ok = report(summary, results, everyone, times, args.min_sigmas, merged)
    if args.smaller:
        print("(--smaller: a test-sized run that makes every row; it is not expected to show signal)")
        return 0
    return 0 if ok else 1


#: Merges --merges makes: name -> (merger, parameters). MergeBench's settings where it has them (task arithmetic
#: lambda 0.4, TIES density 0.2 and lambda 1.0 over the whole model, arXiv:2505.10833), task arithmetic at 0.7
#: (the best of 0.4, 0.7 and 1.0 in our calibration), and the average.
MERGES = {
    "linear": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.4}),
    "task_arithmetic_0.7": ("task_arithmetic", {"lambda": 0.7}),
    "ties": ("ties", {"density": 0.2, "lambda": 1.0, "trim_scope": "model", "normalize": False}),
}


def merge_specialists(out: Path, base: Path, models: dict, results: Path, options) -> dict[str, Path]:
    """Merge the five specialists with each of :data:`MERGES` and evaluate the merges; timed apart."""
    import yaml

    from mergeplug.engine import merge
    from mergeplug.evaluate_models import evaluate_models

    merged = {}
    for name, (method, parameters) in MERGES.items():
        recipe = {"method": method, "parameters": parameters, "models": [{"model": str(models[d])} for d in DOMAINS]}
        if method != "linear":
            recipe["base_model"] = str(base)
        path = out / "merges" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        start = time.perf_counter()
        merged[f"merge {name}"] = merge(path, out / "merges" / name, force=True, progress=False)
        evaluate_models([str(merged[f"merge {name}"])], EVALUATED, results, options)
        print(f"merge and evaluate {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return merged


def domain_stderr(metrics_file: Path, domain: str) -> float:
    """The standard error of a domain score: its benchmarks' headline standard errors, weighted as the score."""
    benches = json.loads(metrics_file.read_text(encoding="utf-8"))["domains"][domain]
    total = sum(b["weight"] for b in benches.values())
    variance = sum((b["weight"] / total * (b["metrics"][b["headline"]]["stderr"] or 0.0)) ** 2
                   for b in benches.values())
    return math.sqrt(variance)


def report(summary: dict, results: Path, everyone: dict, times: dict, min_sigmas: float, merged: dict) -> bool:
    from mergeplug.evaluate_models import model_key

    scores = {name: summary["models"][str(path)]["domain_scores"] for name, path in {**everyone, **merged}.items()}
    short = {d: d.removeprefix("tiny_") for d in EVALUATED}
    print("\n| model | " + " | ".join(short.values()) + " | mean of domains | normalised |")
    print("|---" * (len(EVALUATED) + 3) + "|")
    for name, per in scores.items():
        values = [per[d] for d in DOMAINS]
        normalised = summary["models"][str({**everyone, **merged}[name])].get("normalised_mean", math.nan)
        print(f"| {name} | " + " | ".join(f"{per[d]:.3f}" for d in EVALUATED) + f" | {sum(values) / len(values):.3f} | "
              f"{normalised:.3f} |")
    print("\n| domain | base | specialist | gain | stderr of gain | gain / stderr | multitask |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for domain in DOMAINS:
        base_se = domain_stderr(results / model_key(str(everyone["base"])) / "metrics.json", domain)
        own_se = domain_stderr(results / model_key(str(everyone[domain])) / "metrics.json", domain)
        gain = scores[domain][domain] - scores["base"][domain]
        se = math.sqrt(base_se ** 2 + own_se ** 2)
        sigmas = gain / se if se else (math.inf if gain > 0 else 0.0)
        ok &= sigmas > min_sigmas
        print(f"| {short[domain]} | {scores['base'][domain]:.3f} | {scores[domain][domain]:.3f} | {gain:+.3f} | "
              f"{se:.3f} | {sigmas:.1f} | {scores['multitask'][domain]:.3f} |")
    print("\n| phase | seconds |\n|---|---|")
    for label, seconds in times.items():
        print(f"| {label} | {seconds:.1f} |")
    finetunes = sum(v for k, v in times.items() if k.startswith("finetune"))
    evaluations = sum(v for k, v in times.items() if k.startswith("evaluate"))
    count = sum(k.startswith("finetune") for k in times)
    print(f"| base + {count} finetunes | {times.get('base', 0) + finetunes:.1f} |")
    print(f"| {sum(k.startswith('evaluate') for k in times)} evaluations | {evaluations:.1f} |")
    print(f"| total | {sum(times.values()):.1f} |")
    print(f"\nevery specialist beats the base on its own domain by more than {min_sigmas} standard errors: "
          f"{'yes' if ok else 'NO'}")
    return ok


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
