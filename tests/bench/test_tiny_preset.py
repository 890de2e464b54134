"""The shipped `tiny` preset: it is valid, it carries the calibrated settings, and the same protocol at test size
(mergeplug.tiny.TINY_SMALLER) yields every row and the report."""
from __future__ import annotations

import json

import yaml

from mergeplug.bench import bench, plan_bench
from mergeplug.bench_command import resolve_recipe
from mergeplug.recipe import check_recipe
from mergeplug.tiny import EVALUATE_DEFAULTS, FINETUNE_DEFAULTS, TINY_SMALLER

from .conftest import write_recipe

TINY_DOMAINS = ["tiny_arithmetic", "tiny_functions", "tiny_formats", "tiny_translation", "tiny_refusal"]


def preset() -> dict:
    return yaml.safe_load(resolve_recipe("tiny").read_text())


def test_the_preset_is_valid_and_carries_the_calibrated_settings():
    data = preset()
    recipe = check_recipe(data, source="tiny.yaml")
    assert data["finetuner"]["parameters"] == FINETUNE_DEFAULTS
    options = EVALUATE_DEFAULTS["backend_options"]
    assert data["evaluation"] == {"backend": EVALUATE_DEFAULTS["backend"], "batch_size": options["batch_size"],
                                  "dtype": options["dtype"]}
    steps = plan_bench(recipe)
    kinds = [s.kind for s in steps]
    # the base ability: learnt by the tiny base, evaluated on every model, trained by no specialist
    assert data["base_abilities"] == ["tiny_reversal"]
    assert next(s for s in steps if s.kind == "base").config["domains"] == [*TINY_DOMAINS, "tiny_reversal"]
    assert all(s.config["domains"][-1] == "tiny_reversal" for s in steps if s.kind == "evaluate")
    assert not any("tiny_reversal" in s.config["domains"] for s in steps if s.kind == "finetune")
    # 1 base build; 5 specialists + multitask; 18 mergers, task_arithmetic x3 and ties x2 -> 21 merges;
    # every model evaluated: base + 6 finetunes + 21 merges.
    assert kinds.count("base") == 1 and kinds.count("finetune") == 6
    assert kinds.count("merge") == 21 and kinds.count("evaluate") == 28 and len(steps) == 56
    methods = {s.config["recipe"]["method"] for s in steps if s.kind == "merge"}
    assert len(methods) == 18 and "slerp" not in methods and {"fisher", "regmean", "multislerp"} <= methods


def test_the_protocol_at_test_size_writes_every_row_and_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = preset()
    small = TINY_SMALLER
    data["base_models"] = [{"name": "tiny", "tiny": {k: v for k, v in small["base"].items()}}]
    data["finetuner"]["parameters"] = dict(small["finetune"])
    data["training_limit"] = 64
    data["evaluation"]["limit"] = 4
    data["mergers"] = [{"name": "task_arithmetic", "parameters": {"lambda": 0.7}},
                       {"name": "ties", "parameters": {"density": 0.5}},
                       {"name": "fisher", "parameters": {"samples": 4, "max_length": 64}}]
    data["executor"] = {"name": "local", "parameters": {"workers": 0}}
    recipe = write_recipe(tmp_path / "tiny-small.yaml", data)
    summary = bench(recipe, tmp_path / "out", progress=False)
    # base build + its evaluation, 6 finetunes + 6 evaluations, 3 merges + 3 evaluations
    assert summary["steps"] == 20 and summary["ok"] == 20 and summary["failed"] == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    scores = [r for r in lines if r["type"] == "score"]
    models = {r["model"] for r in scores}
    assert models == {"tiny", "multitask", *TINY_DOMAINS, "task_arithmetic", "ties", "fisher"}
    assert len(scores) == len(models) * (len(TINY_DOMAINS) + 1)
    assert all(0.0 <= r["score"] <= 1.0 for r in scores)
    assert {r["domain"] for r in scores} == {*TINY_DOMAINS, "tiny_reversal"}
    assert {r["domain_role"] for r in scores if r["domain"] == "tiny_reversal"} == {"base_ability"}
    report = tmp_path / "out" / "report"
    assert (report / "report.md").is_file() and (report / "report.html").is_file()
    text = (report / "report.md").read_text()
    assert all(name in text for name in ("task_arithmetic", "fisher", "tiny_refusal"))
    summary_json = json.loads((report / "report.json").read_text())
    assert summary_json["base_ability_domains"] == ["tiny_reversal"] and summary_json["forgetting_status"] == "ok"
    assert all(isinstance(m["forgetting"]["relative"], float) for m in summary_json["models"] if m["role"] != "base")
