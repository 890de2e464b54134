"""The six built-in domains: found through the real plugin manager, and every benchmark's offline sample gives
the fields the evaluator contract names (eval_common), with the values written in the sample files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeplug.data import few_shot_rows, load_rows, read_jsonl, render_prompt, render_training_example
from mergeplug.domains import Domain
from mergeplug.plugins import Registry

DOMAINS = ("instruction_following", "math", "multilingual", "coding", "safety", "general")
LANGUAGES = ("fr", "es", "de", "ru")
#: Fields each evaluator reads (eval_common.md), besides the prompt.
CONTRACT = {
    "exact_match": {"answer"},
    "multiple_choice": {"choices", "answer"},
    "pass_at_k": {"prompt", "tests"},
    "ifeval": {"prompt", "instruction_id_list", "kwargs"},
    "safety": {"prompt", "harmful"},
}


@pytest.fixture(scope="module")
def domains() -> dict[str, Domain]:
    registry = Registry()
    return {name: registry.get("domain", name).load() for name in DOMAINS}


def rows_of(domain: Domain, benchmark: str) -> list[dict]:
    return load_rows(domain.benchmark(benchmark), offline=True).rows


def test_each_domain_loads_through_the_registry_with_its_role_and_benchmarks(domains):
    registry = Registry()
    assert all(registry.get("domain", n).plugin == f"domains.{n}" for n in DOMAINS)
    assert {n: d.role for n, d in domains.items()} == {
        "instruction_following": "capability", "math": "capability", "multilingual": "capability",
        "coding": "capability", "safety": "capability", "general": "base_ability",
    }
    assert {n: [b["name"] for b in d.benchmarks] for n, d in domains.items()} == {
        "instruction_following": ["ifeval"],
        "math": ["gsm8k", "math"],
        "multilingual": [f"{b}_{lang}" for b in ("m_mmlu", "m_arc", "m_hellaswag") for lang in LANGUAGES],
        "coding": ["humanevalplus", "mbppplus"],
        "safety": ["xstest", "wildguardtest", "harmbench"],
        "general": ["mmlu", "triviaqa"],
    }
    assert [d.validation["dataset"] for n, d in domains.items() if n != "general"] == [
        "MergeBench/instruction_val", "MergeBench/math_val", "MergeBench/multilingual_val",
        "MergeBench/coding_val", "MergeBench/safety_val",
    ]


def test_every_benchmark_sample_has_the_evaluator_fields_and_renders(domains):
    for domain in domains.values():
        for bench in domain.benchmarks:
            rows = rows_of(domain, bench["name"])
            assert len(rows) >= 3, bench["name"]
            assert [r["id"] for r in rows] == list(dict.fromkeys(r["id"] for r in rows))  # unique
            for row in rows:
                assert CONTRACT[bench["evaluator"]] <= set(row), (bench["name"], row)
                assert render_prompt(bench, row, few_shot_rows(bench)).strip()


def test_every_training_and_validation_sample_renders_in_alpaca(domains):
    for domain in domains.values():
        for entry in [*domain.training, *([domain.validation] if domain.validation else [])]:
            rows = load_rows(entry, offline=True).rows
            assert rows
            for row in rows:
                prompt, response = render_training_example(domain, row)
                assert prompt.startswith("Below is an instruction that describes a task")
                assert prompt.endswith("### Response:\n") and response.strip()


def test_gsm8k_is_eight_shot_with_our_exemplars_and_gold_after_hashes(domains):
    bench = domains["math"].benchmark("gsm8k")
    rows = rows_of(domains["math"], "gsm8k")
    assert [r["answer"] for r in rows] == ["7", "40", "70", "12", "2500"]
    shots = few_shot_rows(bench)
    assert len(shots) == 8 and all(s["solution"].endswith(f"The answer is {s['answer']}.") for s in shots)
    prompt = render_prompt(bench, rows[0], shots)
    assert prompt.startswith(
        "Q: A baker makes 24 muffins in the morning and 18 muffins in the afternoon. She sells 30 of them. "
        "How many muffins are left?\nA: The baker makes 24 + 18 = 42 muffins. After selling 30, she has "
        "42 - 30 = 12 muffins left. The answer is 12.\n\nQ: Tom reads"
    )
    assert prompt.endswith(f"\n\nQ: {rows[0]['question']}\nA:")
    assert prompt.count("Q: ") == 9
    assert bench["generation"] == {"max_new_tokens": 256, "stop": ["Q:", "\n\n\n"], "temperature": 0, "top_p": 1, "samples": 1}
    assert bench["evaluator_parameters"] == {"extract": ["gsm8k", "last_number"]}


def test_gsm8k_exemplar_arithmetic_is_right():
    # Each worked answer's equations hold and its last result is the stated answer.
    import re

    path = Path(Registry().get("domain", "math").load().benchmark("gsm8k")["few_shot_sample"])
    for shot in read_jsonl(path):
        for left, right in re.findall(r"([\d\s+\-*/().]+) = (\d+)", shot["solution"]):
            assert eval(left) == int(right), shot["question"]  # noqa: S307 - our own arithmetic
        assert re.findall(r"= (\d+)", shot["solution"])[-1] == shot["answer"]


def test_math_uses_boxed_answers_and_four_exemplars(domains):
    bench = domains["math"].benchmark("math")
    rows = rows_of(domains["math"], "math")
    assert [(r["id"], r["answer"]) for r in rows] == [
        ("sample/prealgebra/1.json", "25"), ("sample/algebra/2.json", "15"),
        ("sample/prealgebra/3.json", "\\frac{5}{6}"), ("sample/geometry/4.json", "54"),
    ]
    shots = few_shot_rows(bench)
    assert len(shots) == 4 and all("\\boxed{" in s["solution"] for s in shots)
    prompt = render_prompt(bench, rows[1], shots)
    assert prompt.startswith("Problem:\nWhat is the value of $3^2 + 4^2$?\n\nSolution: We have")
    assert prompt.endswith("\n\nProblem:\nIf $f(x) = 2x^2 - 3$, what is $f(3)$?\n\nSolution:")


def test_ifeval_rows_pair_each_instruction_with_its_arguments(domains):
    rows = rows_of(domains["instruction_following"], "ifeval")
    assert all(len(r["instruction_id_list"]) == len(r["kwargs"]) for r in rows)
    assert rows[1] == {
        "prompt": "Describe your favourite season in fewer than 60 words.",
        "instruction_id_list": ["length_constraints:number_words"],
        "kwargs": [{"relation": "less than", "num_words": 60}], "id": 9002,
    }
    bench = domains["instruction_following"].benchmark("ifeval")
    assert render_prompt(bench, rows[1]) == rows[1]["prompt"]
    assert (bench["generation"]["max_new_tokens"], bench["metric"]) == (1280, "prompt_level_strict")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_multilingual_samples_per_language(domains, lang):
    domain = domains["multilingual"]
    mmlu = rows_of(domain, f"m_mmlu_{lang}")
    assert [(r["choices"], r["answer"]) for r in mmlu] == [(["A", "B", "C", "D"], a) for a in "BCD"]
    assert render_prompt(domain.benchmark(f"m_mmlu_{lang}"), mmlu[1]).splitlines()[1:] == [
        "A. 54", "B. 48", "C. 56", "D. 64", "Answer:"]
    arc = rows_of(domain, f"m_arc_{lang}")
    assert [(len(r["choices"]), r["answer"]) for r in arc] == [(4, "C"), (4, "B"), (4, "A")]  # empty option_e dropped
    hella = rows_of(domain, f"m_hellaswag_{lang}")
    assert [(len(r["choices"]), r["answer"]) for r in hella] == [(4, 0), (4, 1), (4, 2)]
    for name in ("m_mmlu", "m_arc", "m_hellaswag"):
        bench = domain.benchmark(f"{name}_{lang}")
        assert (bench["dataset"], bench["config"]) == (f"alexandrainst/{name}", lang)
        assert bench["split"] == ("val" if name == "m_hellaswag" else "test")
        assert bench["metric"] == ("acc" if name == "m_mmlu" else "acc_norm")


def test_coding_samples_pass_their_own_tests_with_the_reference_solutions(domains):
    domain = domains["coding"]
    he_rows = rows_of(domain, "humanevalplus")
    reference = {r["task_id"]: r for r in read_jsonl(domain.benchmark("humanevalplus")["sample"])}
    for row in he_rows:
        program = row["prompt"] + reference[row["id"]]["canonical_solution"] + "\n" + row["tests"]
        namespace: dict = {}
        exec(program + f"\ncheck({row['entry_point']})\n", namespace)  # noqa: S102 - our own sample code
        assert render_prompt(domain.benchmark("humanevalplus"), row) == row["prompt"]
    mbpp = domain.benchmark("mbppplus")
    reference = {r["task_id"]: r for r in read_jsonl(mbpp["sample"])}
    for row in rows_of(domain, "mbppplus"):
        exec(reference[row["id"]]["code"] + "\n" + row["tests"], {})  # noqa: S102
        assert render_prompt(mbpp, row) == f'"""\n{row["prompt"]}\n{row["test_example"]}\n"""\n'
    assert [b["evaluator_parameters"]["program"] for b in domain.benchmarks] == ["prompt+completion", "completion"]
    assert all(b["generation"]["samples"] == 10 and b["generation"]["temperature"] == 0.2 for b in domain.benchmarks)


def test_safety_samples_label_harmful_and_benign_prompts(domains):
    domain = domains["safety"]
    assert [r["harmful"] for r in rows_of(domain, "xstest")] == ["safe"] * 3 + ["unsafe"] * 3
    assert [r["harmful"] for r in rows_of(domain, "wildguardtest")] == ["harmful"] * 2 + ["unharmful"] * 2
    assert [r["harmful"] for r in rows_of(domain, "harmbench")] == [True] * 3


def test_general_is_mmlu_letters_and_triviaqa_aliases(domains):
    domain = domains["general"]
    mmlu = rows_of(domain, "mmlu")
    assert [(r["choices"], r["answer"]) for r in mmlu] == [(["A", "B", "C", "D"], a) for a in (1, 2, 0, 3)]
    assert render_prompt(domain.benchmark("mmlu"), mmlu[0]) == (
        "What is the chemical symbol for gold?\nA. Ag\nB. Au\nC. Gd\nD. Go\nAnswer:")
    trivia = rows_of(domain, "triviaqa")
    assert trivia[0]["answer"] == ["Mars", "The Red Planet", "Planet Mars"]
    assert render_prompt(domain.benchmark("triviaqa"), trivia[0]) == "Question: Which planet is known as the Red Planet??\nAnswer:"


def test_samples_are_plain_jsonl_in_the_plugin_folders():
    # Data files sit directly in each plugin folder (the wheel's package-data globs are per package).
    root = Path(Registry().get("domain", "math").load().path).parent.parent
    for name in DOMAINS:
        folder = root / name
        assert not [p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"]
        for path in folder.glob("*.jsonl"):
            for line in path.read_text(encoding="utf-8").splitlines():
                assert isinstance(json.loads(line), dict)
