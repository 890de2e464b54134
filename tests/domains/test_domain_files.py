"""Domain files: what load_domain checks before any data is read, resolve_domains, and a domain added as a
third-party plugin (data and configuration only, no core change)."""
from __future__ import annotations

import json
import textwrap

import pytest

from mergeplug import MergeplugError, hookimpl
from mergeplug.data import load_rows, render_prompt, resolve_domains
from mergeplug.domains import load_domain
from mergeplug.errors import UnknownComponentError
from mergeplug.plugins import Registry

CAPABILITIES = ["coding", "instruction_following", "math", "multilingual", "safety"]

LEGAL = """\
name: legal
description: Legal question answering
benchmarks:
  - name: legal_qa
    columns: {question: q, answer: a}
    sample: sample.jsonl
    prompt: "Q: {question}\\nA:"
    evaluator: exact_match
"""


def write_domain(tmp_path, text=LEGAL, rows=({"q": "Is a verbal contract binding?", "a": "yes"},), extra=None):
    (tmp_path / "sample.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for name, content in (extra or {}).items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    path = tmp_path / "domain.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path, text, **kwargs) -> str:
    with pytest.raises(MergeplugError) as info:
        load_domain(write_domain(tmp_path, text, **kwargs))
    return str(info.value)


def test_a_minimal_domain_gets_the_schema_defaults(tmp_path):
    domain = load_domain(write_domain(tmp_path))
    assert (domain.role, domain.data["prompt_format"], domain.training) == ("capability", "alpaca", [])
    bench = domain.benchmark("legal_qa")
    assert {k: bench[k] for k in ("split", "few_shot", "few_shot_separator", "target", "weight", "generation")} == {
        "split": "test", "few_shot": 0, "few_shot_separator": "\n\n", "target": "{target}", "weight": 1,
        "generation": {"max_new_tokens": 256, "stop": [], "temperature": 0, "top_p": 1, "samples": 1},
    }
    assert bench["sample"] == str(tmp_path / "sample.jsonl")
    rows = load_rows(bench, offline=True).rows
    assert rows == [{"question": "Is a verbal contract binding?", "answer": "yes", "id": 0}]
    assert render_prompt(bench, rows[0]) == "Q: Is a verbal contract binding?\nA:"
    with pytest.raises(MergeplugError, match=r"^domain legal: unknown benchmark 'legal'; known: legal_qa$"):
        domain.benchmark("legal")


def test_a_prompt_field_outside_columns_fails_when_the_domain_loads(tmp_path):
    message = load_error(tmp_path, LEGAL.replace("Q: {question}", "Q: {questoin}"))
    assert message == (
        f"{tmp_path / 'domain.yaml'}: benchmarks[0] (legal_qa).prompt uses {{questoin}}, which `columns` does not map "
        f"(mapped: answer, id, question)"
    )


def test_few_shot_needs_enough_exemplars(tmp_path):
    text = LEGAL + "    few_shot: 2\n"
    assert load_error(tmp_path, text).endswith("benchmarks[0] (legal_qa): few_shot is 2 but no few_shot_sample names the exemplars")
    text += "    few_shot_sample: shots.jsonl\n"
    message = load_error(tmp_path, text, extra={"shots.jsonl": '{"question": "x", "target": "y"}\n'})
    assert message.endswith(f"benchmarks[0] (legal_qa): few_shot is 2 but {tmp_path / 'shots.jsonl'} holds 1 exemplars")


def test_schema_problems_are_one_line_each_with_the_json_path(tmp_path):
    path = tmp_path / "domain.yaml"
    text = LEGAL.replace("columns: {question: q, answer: a}",
                         "columns: {question: q, answer: {column: a, value: 1}}") + "    few_shots: 1\n"
    lines = load_error(tmp_path, text + "role: expert\n").splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}: benchmarks[0]: unknown field 'few_shots' (did you mean 'few_shot'?)")
    assert lines[1].startswith(f"{path}: benchmarks[0].columns.answer: ")
    assert lines[2] == f"{path}: role: 'expert' is not one of ['capability', 'base_ability', 'synthetic']"


def test_duplicate_benchmarks_training_fields_templates_and_files_are_checked(tmp_path):
    path = tmp_path / "domain.yaml"
    second = LEGAL.split("benchmarks:\n")[1]
    assert load_error(tmp_path, LEGAL + second) == (
        f"{path}: benchmarks[1]: a second benchmark named 'legal_qa'; names must be unique in a domain")
    training = LEGAL + "training:\n  - dataset: org/sft\n    columns: {instruction: q}\n"
    assert load_error(tmp_path, training) == (
        f"{path}: training[0].columns: map `instruction` and `response` (and optionally `input`), or `messages`; mapped: instruction")
    assert load_error(tmp_path, LEGAL + "prompt_format: \"Q: {instruction}\"\n") == (
        f"{path}: prompt_format: a template uses {{instruction}}, optionally {{input}}, and {{response}} exactly once "
        f"(or write alpaca or chat); this one uses instruction")
    assert load_error(tmp_path, LEGAL.replace("sample: sample.jsonl", "sample: gone.jsonl")) == (
        f"{path}: benchmarks[0] (legal_qa).sample: file gone.jsonl does not exist (looked in {tmp_path})")
    assert load_error(tmp_path, LEGAL.replace("Q: {question}", "Q: {question")).startswith(
        f"{path}: benchmarks[0] (legal_qa).prompt: 'Q: {{question\\nA:' is not a valid format string")


def test_all_is_the_five_capability_domains_and_names_are_checked(use_registry):
    use_registry(Registry())
    assert [d.name for d in resolve_domains("all")] == CAPABILITIES
    assert [d.name for d in resolve_domains("all,general")] == [*CAPABILITIES, "general"]
    assert [d.name for d in resolve_domains(["math", "math", "coding"])] == ["math", "coding"]
    with pytest.raises(UnknownComponentError) as info:
        resolve_domains("maths,coding")
    assert str(info.value).startswith("unknown domain 'maths'; known: math, ")
    tiny = {"tiny_arithmetic", "tiny_formats", "tiny_functions", "tiny_refusal", "tiny_reversal", "tiny_translation"}
    assert set(str(info.value).split("known: ")[1].split(", ")) == {*CAPABILITIES, "general", *tiny}
    with pytest.raises(MergeplugError, match=r"^no domain given"):
        resolve_domains(" , ")


def test_a_third_party_domain_is_a_plugin_with_data_only(tmp_path, use_registry):
    path = write_domain(tmp_path)

    class LegalPlugin:
        @hookimpl
        def register_domains(self, register):
            register("legal", path, description="Legal question answering")

    registry = use_registry(Registry(plugins=[("legal", LegalPlugin())], entry_points=[]))
    assert registry.names("domain") == ["legal"]
    (domain,) = resolve_domains("all")
    assert domain.name == "legal" and domain.benchmarks[0]["name"] == "legal_qa"


def test_the_new_plugin_domain_template_is_valid(tmp_path):
    from mergeplug.scaffold import write_plugin

    folder = write_plugin("domain", "legal", tmp_path / "pkg")
    domain = load_domain(folder / "mergeplug_legal" / "domain.yaml")
    bench = domain.benchmarks[0]
    assert (bench["metric"], bench["evaluator_parameters"]) == ("exact_match_last_number", {"extract": ["last_number"]})
    rows = load_rows(bench, offline=True).rows
    assert rows[0] == {"question": "What is 2 + 3?", "answer": "5", "id": 0}
    assert render_prompt(bench, rows[0]) == "Q: What is 2 + 3?\nA:"
    assert load_rows(domain.training[0], offline=True).rows[1] == {"instruction": "What is 7 - 4?", "response": "3", "id": 1}
