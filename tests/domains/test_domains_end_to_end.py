"""Every benchmark of every built-in domain runs end to end on its offline sample: rows load, prompts render,
the real evaluator (through the registry) builds its requests, and hand-written perfect answers score 1.0 on
the benchmark's headline metric. This ties the sample fields and evaluator_parameters to the evaluators."""
from __future__ import annotations

import pytest

from mergeplug.data import few_shot_rows, load_rows, read_jsonl, render_prompt
from mergeplug.evaluation import Generate, Loglikelihood, LoglikelihoodResult
from mergeplug.plugins import Registry
from mergeplug.schema import problems, with_defaults

#: Responses that follow every instruction of ifeval_sample.jsonl, by key.
IFEVAL_RESPONSES = {
    9001: "Dear neighbours\nPlease join us for a garden party on Saturday at four.\nBring a snack if you like.",
    9002: "Autumn is my favourite season: crisp air, and leaves that glow red and gold.",
    9003: "* Water when the top soil is dry.\n* Give them bright indirect light.\n* Wipe the dust off their leaves.",
    9004: "i left my umbrella on the bus. it rained all the way home.",
    9005: "Sunlight holds every colour, and air molecules scatter blue light far more than red. "
          "This scattering spreads blue across the sky. Any other questions?",
    9006: "<<The Quiet Room>>\nRows of books stand still,\nonly pages whisper here.",
}
BENCHMARKS = [(d, b["name"]) for d in ("instruction_following", "math", "multilingual", "coding", "safety", "general")
              for b in Registry().get("domain", d).load().benchmarks]


def perfect_answers(evaluator_name: str, bench: dict, row: dict, requests: list) -> list:
    if evaluator_name == "multiple_choice":
        answer = row["answer"]
        gold = answer if isinstance(answer, int) else row["choices"].index(answer) if answer in row["choices"] \
            else "ABCDEFGHIJ".index(answer)
        assert all(isinstance(r, Loglikelihood) for r in requests) and len(requests) == len(row["choices"])
        return [LoglikelihoodResult(0.0 if i == gold else -10.0, 1, i == gold) for i in range(len(requests))]
    (request,) = requests
    assert isinstance(request, Generate)
    if evaluator_name == "exact_match":
        gold = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
        extract = bench["evaluator_parameters"]["extract"]
        text = f"The answer is $\\boxed{{{gold}}}$." if "boxed" in extract else \
            gold if extract == ["none"] else f"We work it out. The answer is {gold}."
        return [[text] * request.samples]
    if evaluator_name == "ifeval":
        return [[IFEVAL_RESPONSES[row["id"]]]]
    if evaluator_name == "safety":
        harmful = row["harmful"] in (True, "unsafe", "harmful")
        return [["I'm sorry, but I can't help with that." if harmful else "Sure! Here is a helpful answer."]]
    if evaluator_name == "pass_at_k":
        reference = {r["task_id"]: r for r in read_jsonl(bench["sample"])}[row["id"]]
        return [[reference.get("canonical_solution") or reference["code"]] * request.samples]
    raise AssertionError(evaluator_name)


@pytest.mark.parametrize("domain_name,benchmark_name", BENCHMARKS, ids=[f"{d}/{b}" for d, b in BENCHMARKS])
def test_the_sample_scores_one_with_perfect_answers(domain_name, benchmark_name):
    registry = Registry()
    bench = registry.get("domain", domain_name).load().benchmark(benchmark_name)
    component = registry.get("evaluator", bench["evaluator"])
    assert problems(bench["evaluator_parameters"], component.parameters, source=benchmark_name) == []
    evaluator = component.load()(**with_defaults(bench["evaluator_parameters"], component.parameters))
    assert bench["metric"] in evaluator.metrics
    rows = load_rows(bench, offline=True).rows
    assert set(evaluator.required_fields) <= set(rows[0])
    shots = few_shot_rows(bench)
    answers = []
    for row in rows:
        requests = evaluator.requests(row, render_prompt(bench, row, shots), bench["generation"])
        answers.append(perfect_answers(bench["evaluator"], bench, row, requests))
    batch = getattr(evaluator, "score_batch", None)
    scored = batch(rows, answers) if batch else [evaluator.score(r, a) for r, a in zip(rows, answers)]
    metric = evaluator.aggregate(scored)[bench["metric"]]
    # refusal_rate counts the harmful prompts only.
    counted = [r for r in rows if bench["evaluator"] != "safety" or r["harmful"] in (True, "unsafe", "harmful")]
    assert (metric.value, metric.n) == (1.0, len(counted))
