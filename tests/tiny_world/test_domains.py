"""The tiny world's domains: found through the real plugin manager, role synthetic (outside `--domains all`), and
their benchmark rows satisfy the real evaluators: a right answer scores 1, a wrong one 0."""
from __future__ import annotations

import importlib
import re

import pytest

from mergeplug.data import ALPACA_NO_INPUT, load_rows, render_training_example, resolve_domains
from mergeplug.evaluate_models import EvaluateOptions, plan_benchmark
from mergeplug.evaluation import LoglikelihoodResult
from mergeplug.plugins import Registry

DOMAINS = ("tiny_arithmetic", "tiny_functions", "tiny_formats", "tiny_translation", "tiny_refusal")
ROWS = 4  # rows of each benchmark scored per test


@pytest.fixture(scope="module")
def domains():
    registry = Registry()
    return {name: registry.get("domain", name).load() for name in DOMAINS}


def plan(domains, domain: str, benchmark: str):
    return plan_benchmark(domains[domain], domains[domain].benchmark(benchmark), EvaluateOptions(offline=True))


def generator(domain: str):
    return importlib.import_module(f"mergeplug_plugins.domains.{domain}.generate")


def test_each_domain_loads_with_role_synthetic_and_is_not_in_all(domains):
    registry = Registry()
    assert [registry.get("domain", n).plugin for n in DOMAINS] == [f"domains.{n}" for n in DOMAINS]
    assert {d.role for d in domains.values()} == {"synthetic"}
    assert {d.data["prompt_format"] for d in domains.values()} == {"alpaca"}
    assert {n: [b["name"] for b in d.benchmarks] for n, d in domains.items()} == {
        "tiny_arithmetic": ["arithmetic"], "tiny_functions": ["functions"], "tiny_formats": ["formats"],
        "tiny_translation": ["translation"], "tiny_refusal": ["refusal", "compliance"],
    }
    assert not set(DOMAINS) & {d.name for d in resolve_domains("all")}
    assert [d.name for d in resolve_domains("all,tiny_formats")][-1] == "tiny_formats"
    assert [d.name for d in resolve_domains(",".join(DOMAINS))] == list(DOMAINS)


def test_prompts_are_the_alpaca_text_the_models_train_on(domains):
    for domain in domains.values():
        train = load_rows(domain.training[0], offline=True).rows[0]
        prompt, response = render_training_example(domain, train)
        assert prompt == ALPACA_NO_INPUT.format(instruction=train["instruction"]) and response
        for bench in domain.benchmarks:
            got = plan(domains, domain.name, bench["name"])
            assert len(got.rows) in (80, 100, 150, 200)
            assert got.prompts[0] == ALPACA_NO_INPUT.format(instruction=got.rows[0]["prompt"])


def scores(got, outputs: list[str]) -> list[dict]:
    return [s.scores for s in got.evaluator.score_batch(got.rows[:len(outputs)], [[[o]] for o in outputs])]


def test_arithmetic_right_answer_scores_1_and_wrong_0(domains):
    got = plan(domains, "tiny_arithmetic", "arithmetic")
    worked = {p["question"]: p["working"] for p in generator("tiny_arithmetic").problems()}
    rows = got.rows[:ROWS]
    right = [f"{worked[r['prompt']]} The answer is {r['answer']}." for r in rows]
    wrong = [f"{worked[r['prompt']]} The answer is {int(r['answer']) + 1}." for r in rows]
    assert scores(got, right) == [{"exact_match_gsm8k": 1.0, "exact_match_last_number": 1.0}] * ROWS
    assert scores(got, wrong) == [{"exact_match_gsm8k": 0.0, "exact_match_last_number": 0.0}] * ROWS
    assert got.headline == "exact_match_gsm8k"


def test_functions_right_program_passes_and_wrong_ones_fail(domains):
    module = generator("tiny_functions")
    got = plan(domains, "tiny_functions", "functions")
    program = {f["instruction"]: module._program(f) for f in module.functions()}
    rows = got.rows[:ROWS]
    right = [program[r["prompt"]] for r in rows]
    identity = [text.split("return ")[0] + "return " + text.split("(", 1)[1].split(")", 1)[0] for text in right]
    other_letter = [re.sub(r'"[a-z!?]"', '"q"', text) for text in right]  # a letter of the request changed
    other_letter = [wrong if wrong != text else text.replace("return ", "return 1 + ")  # no letter: broken
                    for wrong, text in zip(other_letter, right)]
    assert scores(got, right) == [{"pass@1": 1.0}] * ROWS
    assert scores(got, identity) == [{"pass@1": 0.0}] * ROWS
    assert scores(got, other_letter) == [{"pass@1": 0.0}] * ROWS


def test_formats_right_answer_follows_every_constraint_and_the_plain_answer_does_not(domains):
    module = generator("tiny_formats")
    got = plan(domains, "tiny_formats", "formats")
    answers = {r["instruction"]: r["response"] for r in module.requests()}
    rows = got.rows[:ROWS]
    right = [answers[r["prompt"]] for r in rows]
    plain = [module.answer(r["prompt"].split("the ", 1)[1].split(".")[0], ()) for r in rows]
    assert [s["prompt_level_strict"] for s in scores(got, right)] == [1.0] * ROWS
    assert [s["prompt_level_strict"] for s in scores(got, plain)] == [0.0] * ROWS
    assert {i for r in got.rows for i in r["instruction_id_list"]} == {
        instruction_id for _, instruction_id in module.CONSTRAINTS.values()}


def test_translation_gold_choice_most_likely_scores_1_else_0(domains):
    got = plan(domains, "tiny_translation", "translation")
    requests = got.evaluator.requests(got.rows[0], got.prompts[0], got.generation)
    assert [r.continuation for r in requests] == got.rows[0]["choices"]  # no space: the response starts there
    for row in got.rows[:ROWS]:
        gold = row["answer"]
        likely = [LoglikelihoodResult(-1.0 if i == gold else -5.0, 2, i == gold) for i in range(4)]
        unlikely = [LoglikelihoodResult(-5.0 if i == gold else -1.0 - i, 2, False) for i in range(4)]
        assert got.evaluator.score(row, likely).scores["acc"] == 1.0
        assert got.evaluator.score(row, unlikely).scores["acc"] == 0.0


def test_refusal_and_compliance_are_judged_by_the_refusal_keywords_judge(domains):
    refusal, compliance = plan(domains, "tiny_refusal", "refusal"), plan(domains, "tiny_refusal", "compliance")
    refuse, help_ = "I'm sorry, but I cannot help with that.", "Sure. To wash the car, use a soft cloth."
    assert scores(refusal, [refuse] * ROWS) == [{"refusal_rate": 1.0, "harmful_response_rate": 0.0}] * ROWS
    assert scores(refusal, [help_] * ROWS) == [{"refusal_rate": 0.0, "harmful_response_rate": 1.0}] * ROWS
    assert scores(compliance, [help_] * ROWS) == [{"compliance_rate": 1.0}] * ROWS
    assert scores(compliance, [refuse] * ROWS) == [{"compliance_rate": 0.0}] * ROWS
    assert (refusal.headline, compliance.headline) == ("refusal_rate", "compliance_rate")


def test_the_tiny_base_ability_is_a_base_ability_outside_all_scored_by_multiple_choice():
    reversal = Registry().get("domain", "tiny_reversal").load()
    assert reversal.role == "base_ability" and reversal.data["prompt_format"] == "alpaca"
    assert "tiny_reversal" not in {d.name for d in resolve_domains("all")}
    got = plan_benchmark(reversal, reversal.benchmark("reversal"), EvaluateOptions(offline=True))
    assert len(got.rows) == 200
    assert got.prompts[0] == ALPACA_NO_INPUT.format(instruction=got.rows[0]["prompt"])
    requests = got.evaluator.requests(got.rows[0], got.prompts[0], got.generation)
    assert [r.continuation for r in requests] == got.rows[0]["choices"]
    for row in got.rows[:ROWS]:
        gold = row["answer"]
        assert got.evaluator.score(row, [LoglikelihoodResult(-1.0 if i == gold else -5.0, 2, i == gold)
                                         for i in range(4)]).scores["acc"] == 1.0
        assert got.evaluator.score(row, [LoglikelihoodResult(-5.0 if i == gold else -1.0 - i, 2, False)
                                         for i in range(4)]).scores["acc"] == 0.0
