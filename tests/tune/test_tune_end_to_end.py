"""``mergeplug tune`` on a constructed problem: one math specialist, task arithmetic, λ in {0, 0.5, 1}.

At λ = 1 the merged model IS the specialist (θ_base + 1·(θ_ft − θ_base), computed as 0·θ_base + 1·θ_ft), so
its normalised score is exactly 1.0; the specialist was trained on the validation rows, so smaller λ score lower.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import mergeplug.engine as engine
from mergeplug import hookimpl
from mergeplug.cli import cli
from mergeplug.merging import Merger, summed_task_vectors
from mergeplug.plugins import Registry
from mergeplug.recipe import load_recipe
from mergeplug.tuning import tune


@pytest.fixture
def count_merges(monkeypatch):
    merged = []
    real = engine.run_merge

    def counting(plan, out, **kwargs):
        merged.append(dict(plan.recipe.data["parameters"]))
        return real(plan, out, **kwargs)

    monkeypatch.setattr(engine, "run_merge", counting)
    return merged


def test_finds_the_specialist_at_lambda_one_and_resumes(tune_recipe, tmp_path, offline, count_merges, world):
    recipe = tune_recipe()
    out = tmp_path / "out"
    result = tune(recipe, out, progress=False, keep=True)
    by_lambda = {t.parameters["lambda"]: t for t in result.trials}
    assert sorted(by_lambda) == [0.0, 0.5, 1.0]
    assert result.best.parameters == {"lambda": 1.0}
    assert result.best.objective == 1.0 and result.best.normalised == {"math": 1.0}
    assert by_lambda[0.0].objective < by_lambda[0.5].objective < 1.0
    specialist = result.specialists["math"]["score"]
    assert result.best.scores["math"] == specialist
    # score = exp(mean token log-likelihood): a probability-like number, far above the base's
    assert 0.0 < by_lambda[0.0].scores["math"] < specialist < 1.0
    assert math.isclose(by_lambda[0.5].normalised["math"], by_lambda[0.5].scores["math"] / specialist)
    assert len(count_merges) == 3 and result.ran == 3

    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["parameters"] for r in records] == [{"lambda": 0.0}, {"lambda": 0.5}, {"lambda": 1.0}]
    assert all(r["status"] == "ok" and r["merge_seconds"] >= 0 and r["evaluation_seconds"] > 0 for r in records)
    table = (out / "trials.md").read_text().splitlines()
    assert table[0] == "| trial | lambda | objective | math | merge s | eval s | status |"
    assert table[2].startswith("| **3** (best) | 1 | 1.0000 | 1.0000 |")
    assert [row.split("|")[2].strip() for row in table[2:]] == ["1", "0.5", "0"]
    summary = json.loads((out / "tune.json").read_text())
    assert summary["best"]["parameters"] == {"lambda": 1.0} and summary["trials"]["ok"] == 3
    assert not (out / ".work").exists()

    # best_recipe.yaml is a merge recipe with the best value; --keep kept that model: the specialist's weights.
    best = load_recipe(out / "best_recipe.yaml", kind="merge")
    assert best.data["parameters"]["lambda"] == 1.0 and best.data["method"] == "task_arithmetic"
    kept, original = load_file(out / "best_model" / "model.safetensors"), load_file(world["math"] / "model.safetensors")
    assert kept.keys() == original.keys() and all(torch.equal(kept[k], original[k]) for k in kept)

    # Resume: the same recipe again merges nothing and gives the same result.
    again = tune(recipe, out, progress=False)
    assert len(count_merges) == 3 and again.ran == 0
    assert again.best.parameters == {"lambda": 1.0} and again.best.objective == 1.0

    # A wider grid: only the new points are merged.
    wider = tune_recipe(search={"space": {"lambda": [0.0, 0.5, 1.0, 0.75]}}, name="wider.yaml")
    grown = tune(wider, out, progress=False)
    assert count_merges[3:] == [{"lambda": 0.75, "normalize": False}] and grown.ran == 1
    assert 1.0 > next(t for t in grown.trials if t.parameters == {"lambda": 0.75}).objective > by_lambda[0.5].objective


def test_a_changed_objective_is_refused_unless_forced(tune_recipe, tmp_path, offline, count_merges):
    out = tmp_path / "out"
    tune(tune_recipe(search={"space": {"lambda": [1.0]}}), out, progress=False)
    with pytest.raises(Exception) as info:
        tune(tune_recipe(search={"space": {"lambda": [1.0]}}), out, progress=False, limit=2)
    assert str(info.value) == (f"{out}: holds trials of another search (changed since: objective.limit, "
                               f"objective.data.math.rows, objective.data.math.texts); pass --force to discard them "
                               f"and start over, or choose another output folder")
    forced = tune(tune_recipe(search={"space": {"lambda": [1.0]}}), out, progress=False, limit=2, force=True)
    assert forced.ran == 1 and len(count_merges) == 2 and len(forced.trials) == 1
    assert forced.best.objective == 1.0


class Flaky:
    """A merger that fails for λ = 0.5 (a plugin's bug on one trial)."""

    class Merger(Merger):
        needs_base = True

        def merge(self, inputs):
            if inputs.parameters["lambda"] == 0.5:
                raise RuntimeError("cannot merge at one half")
            return summed_task_vectors(inputs, scale=float(inputs.parameters["lambda"]))

    @hookimpl
    def register_mergers(self, register):
        register("flaky", Flaky.Merger, description="Task arithmetic that fails at 0.5.", reference="arXiv:2212.04089",
                 parameters={"type": "object", "additionalProperties": False, "properties": {
                     "lambda": {"type": "number", "default": 1.0, "description": "Scale."}}}, needs_base=True)


def test_a_failing_trial_is_recorded_and_the_rest_completes(tune_recipe, world, tmp_path, offline, use_registry):
    registry = use_registry(Registry(plugins=[("flaky", Flaky())]))
    recipe = tune_recipe(merge={"method": "flaky", "base_model": str(world["base"]),
                                "models": [{"model": str(world["math"]), "domain": "math"}]})
    result = tune(recipe, tmp_path / "out", progress=False, registry=registry)
    status = {t.parameters["lambda"]: (t.status, t.error) for t in result.trials}
    assert status[0.5] == ("failed", "merger 'flaky' failed on tensor lm_head.weight: "
                                     "RuntimeError: cannot merge at one half")
    assert status[0.0][0] == status[1.0][0] == "ok"
    assert result.best.parameters == {"lambda": 1.0} and result.best.objective == 1.0
    table = (tmp_path / "out" / "trials.md").read_text().splitlines()
    assert table[-1].startswith("| 2 | 0.5 | – | – |") and "| failed: merger 'flaky' failed on tensor" in table[-1]
    assert not (tmp_path / "out" / ".work").exists()


def test_the_cli_prints_the_table_and_the_best(tune_recipe, tmp_path, offline):
    args = ["tune", str(tune_recipe()), "-o", str(tmp_path / "out"), "--limit", "2"]
    result = CliRunner().invoke(cli, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-2] == "best: objective 1.0000 at lambda=1.0 (trial 3; 3 run now, 3 recorded)"
    assert lines[-1] == f"wrote {tmp_path / 'out' / 'best_recipe.yaml'}"
    shown = CliRunner().invoke(cli, args)
    assert shown.exit_code == 0 and "| **3** (best) | 1 | 1.0000 | 1.0000 |" in shown.stdout
    assert "(trial 3; 0 run now, 3 recorded)" in shown.stdout


class Strict:
    """A merger whose schema bounds lambda only in strict mode: a check across two parameters, which only the
    trial's full merge-recipe check sees."""

    @hookimpl
    def register_mergers(self, register):
        register("strict_ta", Flaky.Merger, description="Task arithmetic with a mode.", reference="arXiv:2212.04089",
                 needs_base=True, parameters={
                     "type": "object", "additionalProperties": False,
                     "properties": {"lambda": {"type": "number", "default": 1.0, "description": "Scale."},
                                    "mode": {"enum": ["loose", "strict"], "default": "loose", "description": "Mode."}},
                     "if": {"properties": {"mode": {"const": "strict"}}, "required": ["mode"]},
                     "then": {"properties": {"lambda": {"maximum": 1}}}})


def test_a_trial_whose_recipe_fails_its_check_names_the_trial_and_parameter(tune_recipe, world, tmp_path, offline,
                                                                            use_registry, count_merges):
    registry = use_registry(Registry(plugins=[("strict", Strict())]))
    recipe = tune_recipe(merge={"method": "strict_ta", "base_model": str(world["base"]),
                                "models": [{"model": str(world["math"]), "domain": "math"}]},
                         search={"space": {"mode": ["strict"], "lambda": [1.0, 2.0]}})
    result = tune(recipe, tmp_path / "out", progress=False, registry=registry)
    assert [(t.status, t.error) for t in result.trials] == [
        ("ok", None),
        ("failed", "trial 2 (mode=strict, lambda=2): parameters.lambda: 2.0 is greater than the maximum of 1")]
    assert len(count_merges) == 1, "a trial that fails its check is never merged"
    assert result.best.objective == 1.0
