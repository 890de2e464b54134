"""The report's numbers equal their formulas on the hand-made results file (conftest's table): normalised
performance against the specialists of each model's OWN base, forgetting against that base per benchmark,
merge cost from the merge step, failed and skipped steps listed, a missing domain noted, later lines winning."""
from __future__ import annotations

import math

import pytest

from mergeplug.errors import MergeplugError
from mergeplug.evaluate_models import forgetting, normalised_performance
from mergeplug.report import compute, load_results

from .conftest import DOMAINS, MODELS, score_rows, step_rows, write_lines


def model(summary, base, label):
    (found,) = [m for m in summary["models"] if m["base"] == base and m["label"] == label]
    return found


def test_formulas_by_hand():
    assert normalised_performance(0.6, 0.8) == pytest.approx(0.75)
    assert normalised_performance(0.3, 0.0) is None  # a specialist at 0 gives no ratio, not a division error
    assert normalised_performance(None, 0.5) is None and normalised_performance(0.5, None) is None
    assert normalised_performance(math.nan, 0.5) is None and normalised_performance(0.5, math.nan) is None
    relative, absolute = forgetting([0.8, 0.4, 0.0, None], [0.4, 0.4, 0.1, 0.3])
    # pairs: (0.8, 0.4), (0.4, 0.4), (0.0, 0.1); the None pair is left out; a base at 0 has no relative drop
    assert absolute == pytest.approx((0.4 + 0.0 - 0.1) / 3)
    assert relative == pytest.approx((0.4 / 0.8 + 0.0) / 2)
    assert forgetting([], []) == (None, None)
    assert forgetting([None], [0.5]) == (None, None)
    with pytest.raises(MergeplugError, match="2 base values but 1 model values"):
        forgetting([0.1, 0.2], [0.1])


def test_normalised_performance_against_the_models_own_base(results_file):
    summary = compute(load_results(results_file))
    assert summary["bases"] == ["alpha", "beta"]
    assert summary["capability_domains"] == ["arith", "code"]  # synthetic counts as a capability
    assert summary["base_ability_domains"] == ["general"]
    assert summary["specialists"] == {"alpha": {"arith": "alpha/arith", "code": "alpha/code"},
                                      "beta": {"arith": "beta/arith", "code": "beta/code"}}
    ties_alpha = model(summary, "alpha", "ties density=0.2")
    assert ties_alpha["scores"]["arith"] == 0.6, "the later line for (alpha, ties, arith) replaces the earlier 0.1"
    assert ties_alpha["normalised"] == pytest.approx({"arith": 0.6 / 0.8, "code": 0.4 / 0.5})
    assert ties_alpha["normalised_mean"] == pytest.approx((0.6 / 0.8 + 0.4 / 0.5) / 2)
    assert ties_alpha["normalised_complete"] is True
    # The same label under base beta is its own model, measured against beta's specialists (1.0 and 0.25).
    ties_beta = model(summary, "beta", "ties density=0.2")
    assert ties_beta["normalised"] == pytest.approx({"arith": 0.5 / 1.0, "code": 0.25 / 0.25})
    multitask = model(summary, "alpha", "alpha/multitask")
    assert multitask["normalised_mean"] == pytest.approx((0.7 / 0.8 + 0.45 / 0.5) / 2)
    assert model(summary, "alpha", "alpha/arith")["normalised"]["arith"] == 1.0


def test_a_model_missing_a_domain_gets_a_partial_unranked_mean_and_a_note(results_file):
    summary = compute(load_results(results_file))
    dare = model(summary, "alpha", "dare p=0.9")
    assert dare["scores"] == {"arith": 0.7, "general": pytest.approx(0.6)}
    assert dare["missing_domains"] == ["code"]
    assert dare["normalised"] == pytest.approx({"arith": 0.7 / 0.8})
    assert dare["normalised_mean"] == pytest.approx(0.875) and dare["normalised_complete"] is False
    assert any("dare p=0.9" in n and "no score for code" in n and "1 of 2" in n for n in summary["notes"])
    (dare_method,) = [m for m in summary["methods"] if m["method"] == "dare"]
    assert dare_method["best"] is None and dare_method["ranked"] == 0


def test_forgetting_per_benchmark_against_the_base_of_the_model(results_file):
    summary = compute(load_results(results_file))
    ties_alpha = model(summary, "alpha", "ties density=0.2")
    # base alpha: facts 0.8, trivia 0.4; ties: facts 0.4, trivia 0.4
    assert ties_alpha["forgetting"]["absolute"] == pytest.approx(((0.8 - 0.4) + 0.0) / 2)
    assert ties_alpha["forgetting"]["relative"] == pytest.approx(((0.8 - 0.4) / 0.8 + 0.0) / 2)
    assert ties_alpha["forgetting"]["pairs"] == 2
    linear = model(summary, "alpha", "linear weight=0.5")
    assert linear["forgetting"]["relative"] == pytest.approx((0.0 + (0.4 - 0.3) / 0.4) / 2)
    assert linear["forgetting"]["absolute"] == pytest.approx((0.0 + 0.1) / 2)
    # base beta: facts 0.5, trivia 0.5; beta's ties: facts 0.25, trivia 0.5
    ties_beta = model(summary, "beta", "ties density=0.2")
    assert ties_beta["forgetting"]["relative"] == pytest.approx((0.25 / 0.5 + 0.0) / 2)
    assert ties_beta["forgetting"]["absolute"] == pytest.approx(0.25 / 2)
    assert model(summary, "alpha", "alpha")["forgetting"] is None, "the base is not compared with itself"
    # a specialist forgets too: alpha/arith facts 0.6 against 0.8
    assert model(summary, "alpha", "alpha/arith")["forgetting"]["relative"] == pytest.approx((0.2 / 0.8) / 2)


def test_no_base_ability_domain_makes_forgetting_na_with_a_note(tmp_path):
    domains = {"arith": "capability", "code": "capability"}
    path = write_lines(tmp_path / "results.jsonl", [*step_rows(), *score_rows(MODELS, domains)])
    summary = compute(load_results(path))
    assert summary["forgetting_status"] == "n/a"
    assert "no base_ability domain" in summary["forgetting_note"]
    assert all(m["forgetting"] is None for m in summary["models"])


def test_merge_cost_problems_and_runtime(results_file):
    summary = compute(load_results(results_file))
    ties_alpha = model(summary, "alpha", "ties density=0.2")
    assert ties_alpha["made_by"] == {"id": "merge-ties-a", "kind": "merge", "status": "ok", "seconds": 2.0,
                                     "peak_memory_mib": 100.0}  # the later "ok" line replaced "running"
    assert ties_alpha["evaluate"] == {"steps": 1, "seconds": 4.0, "peak_memory_mib": 200.0}
    assert model(summary, "beta", "ties density=0.2")["made_by"]["seconds"] == 3.0  # matched by base too
    assert model(summary, "alpha", "linear weight=0.5")["evaluate"] == {"steps": 2, "seconds": 3.0,
                                                                        "peak_memory_mib": 160.0}
    assert model(summary, "alpha", "alpha/arith")["made_by"]["kind"] == "finetune"
    assert summary["problems"] == [
        {"id": "merge-broken-a", "kind": "merge", "label": "merge broken", "status": "failed",
         "error": "RuntimeError: shapes differ at tensor model.layers.0.mlp.up_proj.weight"},
        {"id": "eval-broken-a", "kind": "evaluate", "label": "evaluate broken", "status": "skipped",
         "error": "needs failed step merge-broken-a"},
    ]
    runtime = {r["kind"]: r for r in summary["runtime"]}
    assert list(runtime) == ["base", "finetune", "merge", "evaluate"]
    assert runtime["merge"] == {"kind": "merge", "steps": 5, "ok": 4, "failed": 1, "skipped": 0,
                                "seconds_total": pytest.approx(2.0 + 0.5 + 1.0 + 0.25 + 3.0),
                                "seconds_mean": pytest.approx(6.75 / 5), "seconds_max": 3.0,
                                "peak_memory_mib_max": 120.0}
    assert summary["steps"] == {"ok": 11, "failed": 1, "skipped": 1}
    (ties_method,) = [m for m in summary["methods"] if m["method"] == "ties" and m["base"] == "alpha"]
    assert ties_method["best"] == "ties density=0.2" and ties_method["best_merge_seconds"] == 2.0
    assert DOMAINS == {d["name"]: d["role"] for d in summary["domains"]}


@pytest.mark.parametrize("text, message", [
    ('{"type": "step", "id": "a", "kind": "merge", "status": "ok"}\nnot json\n', "line 2: not valid JSON"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"type": "row"}\n', 'line 1: unknown "type" \'row\''),
    ('\n{"type": "step", "id": "a", "kind": "merge", "status": "done"}\n', 'line 2: step a: "status" "done"'),
    ('{"type": "score", "model": "m", "role": "merged", "domain": "d", "score": "high"}\n',
     'line 1: "score" must be a number or null, got "high"'),
    ('{"type": "score", "model": "m", "role": "expert", "domain": "d", "score": 1}\n', '"role" "expert" is not one of'),
    ('{"type": "score", "model": "m", "role": "specialist", "domain": "d", "score": 1}\n',
     'specialist m: "specialist_domain" must name'),
    ("", "no results in it yet"),
])
def test_invalid_lines_are_one_line_errors_naming_the_line(tmp_path, text, message):
    path = tmp_path / "results.jsonl"
    path.write_text(text)
    with pytest.raises(MergeplugError) as caught:
        load_results(path)
    assert len(caught.value.problems) == 1 and "\n" not in str(caught.value)
    assert message in str(caught.value)


def test_a_torn_last_line_is_left_out_with_a_note_and_a_folder_is_read(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"type": "step", "id": "a", "kind": "merge", "status": "ok"}\n{"type": "sc')
    results = load_results(tmp_path)  # the bench folder
    assert list(results.steps) == ["a"]
    assert results.notes == ["results.jsonl line 2: an incomplete last line (an interrupted write) was left out"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeplugError, match="folder .*empty has no results.jsonl"):
        load_results(tmp_path / "empty")


def test_a_specialist_scoring_zero_takes_its_domain_out_of_the_normalised_mean_with_a_note(tmp_path):
    models = [(b, m, r, meth, p, s, dict(sc, code=0.0) if m == "alpha/code" else sc)
              for b, m, r, meth, p, s, sc in MODELS]
    summary = compute(load_results(write_lines(tmp_path / "results.jsonl", score_rows(models))))
    assert summary["normalised_domains"] == {"alpha": ["arith"], "beta": ["arith", "code"]}
    ties_alpha = model(summary, "alpha", "ties density=0.2")
    assert ties_alpha["normalised"] == pytest.approx({"arith": 0.6 / 0.8})
    assert ties_alpha["normalised_complete"] is True, "complete over the domains that can be normalised"
    assert ("base alpha: specialist alpha/code scored 0.000 on code: no normalised performance there (it would "
            "divide by that score)") in summary["notes"]
