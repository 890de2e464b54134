"""mergeplug bench: the step graph, results, reuse, failures, executors."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
from click.testing import CliRunner

from mergeplug import MergeplugError, hookimpl
from mergeplug import bench as bench_module
from mergeplug.bench import bench, plan_bench
from mergeplug.cli import cli
from mergeplug.plugins import Registry, set_registry
from mergeplug.recipe import check_recipe

from .conftest import bench_recipe, write_recipe


def rows(out, kind):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == kind]


def test_plan_has_every_step_and_content_addressed_ids(tiny_base):
    recipe = check_recipe(bench_recipe(tiny_base), source="b.yaml")
    steps = plan_bench(recipe)
    kinds = [s.kind for s in steps]
    # base evaluated; 2 specialists + multitask, each evaluated; 3 merges, each evaluated
    assert kinds.count("finetune") == 3 and kinds.count("merge") == 3 and kinds.count("evaluate") == 7
    assert len({s.id for s in steps}) == len(steps)
    labels = [s.label for s in steps if s.kind == "merge"]
    assert labels == ["merge linear", "merge ties density=0.5", "merge ties density=1.0"]
    merge = next(s for s in steps if s.label == "merge ties density=0.5")
    specialists = [s.id for s in steps if s.kind == "finetune" and s.meta["role"] == "specialist"]
    assert merge.needs == specialists
    assert merge.config["recipe"]["parameters"] == {"density": 0.5}
    assert [m["domain"] for m in merge.config["recipe"]["models"]] == ["math", "instruction_following"]
    assert merge.config["recipe"]["embeddings"] == "base"  # MergeBench keeps the base's embeddings
    # The same recipe plans the same ids; a changed grid value changes only that merge and its evaluation.
    again = plan_bench(check_recipe(bench_recipe(tiny_base), source="b.yaml"))
    assert [s.id for s in again] == [s.id for s in steps]
    changed = bench_recipe(tiny_base, mergers=["linear", {"name": "ties", "grid": {"density": [0.5, 0.7]}}])
    other = {s.id for s in plan_bench(check_recipe(changed, source="b.yaml"))}
    assert len({s.id for s in steps} - other) == 2


def test_small_bench_writes_every_result_row(smoke):
    summary = smoke.summary
    assert summary["steps"] == 13 and summary["ok"] == 13 and summary["failed"] == 0 and summary["ran"] == 13
    steps = rows(smoke.out, "step")
    assert len(steps) == 13 and all(s["status"] == "ok" for s in steps)
    assert all(s["seconds"] is not None and s["seconds"] >= 0 for s in steps)
    assert all(s["peak_memory_mib"] and s["peak_memory_mib"] > 10 for s in steps)
    scores = rows(smoke.out, "score")
    models = {s["model"] for s in scores}
    assert models == {"small", "math", "instruction_following", "multitask", "linear", "ties density=0.5",
                      "ties density=1.0"}
    assert len(scores) == 14  # 7 models x 2 domains
    roles = {s["model"]: s["role"] for s in scores}
    assert roles["small"] == "base" and roles["math"] == "specialist" and roles["multitask"] == "multitask"
    assert roles["linear"] == "merged"
    by = {(s["model"], s["domain"]): s for s in scores}
    assert by[("math", "math")]["specialist_domain"] == "math"
    assert by[("ties density=0.5", "math")]["parameters"] == {"density": 0.5}
    # The score row holds the evaluation's own numbers: the domain score is its benchmark's headline value.
    metrics = json.loads(next((smoke.out / "steps").glob("evaluate-*/evaluation/*/metrics.json")).read_text())
    assert metrics["domains"]
    ifeval = by[("small", "instruction_following")]["benchmarks"]["ifeval"]
    assert by[("small", "instruction_following")]["score"] == ifeval["value"]
    with open(smoke.out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 14 and {r["model"] for r in table} == models
    merged = next(r for r in table if r["model"] == "linear")
    linear_step = next(s for s in steps if s["label"] == "merge linear")
    assert float(merged["make_seconds"]) == linear_step["seconds"]
    # The report is written at the end, from results.jsonl.
    report = smoke.out / "report"
    assert summary["report"] == str(report)
    for name in ("report.md", "report.html", "report.json", "normalised_vs_cost.png", "scores_math.png",
                 "scores_instruction_following.png"):
        assert (report / name).is_file(), name
    assert "ties density=0.5" in (report / "report.md").read_text()


def test_second_run_does_no_work(smoke, monkeypatch):
    def refuse(config, folder):
        raise AssertionError("a finished step ran again")

    for kind in bench_module.STEP_RUNNERS:
        monkeypatch.setitem(bench_module.STEP_RUNNERS, kind, refuse)
    before = (smoke.out / "results.jsonl").read_text()
    summary = bench(smoke.recipe, smoke.out, progress=False, report=False)
    assert summary["ran"] == 0 and summary["ok"] == 13
    after = [json.loads(line) for line in (smoke.out / "results.jsonl").read_text().splitlines()]
    assert all(r["reused"] for r in after if r["type"] == "step")
    assert [r for r in after if r["type"] == "score"] == [json.loads(line) for line in before.splitlines()
                                                          if json.loads(line)["type"] == "score"]


def test_extended_bench_runs_only_the_new_steps(smoke, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(smoke.out, out)
    ran = []
    original = dict(bench_module.STEP_RUNNERS)
    for kind, fn in original.items():
        monkeypatch.setitem(bench_module.STEP_RUNNERS, kind,
                            lambda config, folder, fn=fn, kind=kind: (ran.append(kind), fn(config, folder)))
    recipe = bench_recipe(smoke.recipe.parent.parent / "x", mergers=["linear", {"name": "ties", "grid": {"density": [0.5, 1.0, 0.3]}}])
    recipe["base_models"] = json.loads((smoke.out / "bench.json").read_text())["recipe"]["base_models"]
    summary = bench(write_recipe(tmp_path / "b.yaml", recipe), out, progress=False, report=False)
    assert ran == ["merge", "evaluate"] and summary["ran"] == 2 and summary["ok"] == 15


class Explode:
    needs_base = True

    def __init__(self, parameters=None):
        self.parameters = parameters or {}

    def merge(self, inputs):
        raise RuntimeError("boom on purpose")


class ExplodePlugin:
    @hookimpl
    def register_mergers(self, register):
        register("explode", Explode, description="Always fails.")


def test_a_failing_step_is_recorded_and_the_rest_completes(tiny_base, tmp_path):
    previous = set_registry(Registry(plugins=[("explode", ExplodePlugin())]))
    try:
        recipe = bench_recipe(tiny_base, domains=["math"], multitask_baseline=False, mergers=["explode", "linear"])
        summary = bench(write_recipe(tmp_path / "b.yaml", recipe), tmp_path / "out", progress=False, report=False)
    finally:
        set_registry(previous)
    assert summary["failed"] == 1 and summary["skipped"] == 1 and summary["ok"] == 5
    steps = {s["label"]: s for s in rows(tmp_path / "out", "step")}
    assert steps["merge explode"]["status"] == "failed"
    assert "boom on purpose" in steps["merge explode"]["error"] and "\n" not in steps["merge explode"]["error"]
    assert steps["evaluate explode"]["status"] == "skipped"
    assert steps["evaluate explode"]["error"] == "needs 'merge explode', which did not finish"
    assert steps["evaluate linear"]["status"] == "ok"
    assert "Traceback" in (tmp_path / "out" / "steps" / steps["merge explode"]["id"] / "error.txt").read_text()
    assert {s["model"] for s in rows(tmp_path / "out", "score")} == {"small", "math", "linear"}


def test_worker_process_and_ray_executors_give_the_same_scores(tiny_base, tmp_path):
    recipe = bench_recipe(tiny_base, domains=["math"], multitask_baseline=False, mergers=["linear"])
    in_process = bench(write_recipe(tmp_path / "a.yaml", recipe), tmp_path / "a", progress=False, report=False)
    workers = bench(tmp_path / "a.yaml", tmp_path / "b", executor="local", executor_parameters={"workers": 1},
                    progress=False, report=False)
    on_ray = bench(tmp_path / "a.yaml", tmp_path / "c", executor="ray", executor_parameters={"num_cpus": 2},
                   progress=False, report=False)
    assert in_process["ok"] == workers["ok"] == on_ray["ok"] == 5

    def scores(folder):
        return {(r["model"], r["domain"]): r["score"] for r in rows(folder, "score")}

    assert scores(tmp_path / "a") == scores(tmp_path / "b") == scores(tmp_path / "c")


def test_bad_input_gives_one_line_errors(tiny_base, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["bench", "nosuchpreset", "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and result.output.startswith("error: nosuchpreset: neither a recipe file nor a preset")
    bad = write_recipe(tmp_path / "b.yaml", bench_recipe(tiny_base, mergers=[{"name": "ties", "grid": {"densty": [1]}}]))
    result = runner.invoke(cli, ["bench", str(bad), "-o", str(tmp_path / "o")])
    assert "b.yaml: mergers[0].grid.densty: merger 'ties' has no parameter 'densty'" in result.output
    with pytest.raises(MergeplugError, match="executor local: parameters.workers: -1 is less than the minimum of 0"):
        bench(write_recipe(tmp_path / "c.yaml", bench_recipe(tiny_base)), tmp_path / "o",
              executor_parameters={"workers": -1}, progress=False)


def test_every_shipped_preset_is_a_valid_bench_that_plans():
    from mergeplug.bench_command import preset_names, resolve_recipe
    from mergeplug.recipe import load_recipe

    names = preset_names()
    assert "mergebench" in names
    for name in names:
        recipe = load_recipe(resolve_recipe(name), kind="bench")
        steps = plan_bench(recipe)
        assert steps and len({s.id for s in steps}) == len(steps)
    mergebench = plan_bench(load_recipe(resolve_recipe("mergebench"), kind="bench"))
    bases = {s.meta["base"] for s in mergebench}
    assert bases == {"llama-3.2-3b", "llama-3.1-8b", "gemma-2-2b", "gemma-2-9b"}
    per_base = [s for s in mergebench if s.meta["base"] == "llama-3.2-3b"]
    # 1 base evaluation; 5 specialists + the multitask baseline, each evaluated; 29 merges, each evaluated
    assert sum(s.kind == "finetune" for s in per_base) == 6 and sum(s.kind == "merge" for s in per_base) == 29
    assert sum(s.kind == "evaluate" for s in per_base) == 1 + 6 + 29


def test_base_filter_keeps_the_named_base(tiny_base, tmp_path):
    with pytest.raises(MergeplugError, match="no base model labelled 'nope'; labels: small"):
        bench(write_recipe(tmp_path / "b.yaml", bench_recipe(tiny_base)), tmp_path / "o", bases=["nope"],
              progress=False)
