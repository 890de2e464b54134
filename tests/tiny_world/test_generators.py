"""The tiny world's generators: deterministic, the shipped files are their output, and test rows are disjoint
from training by construction."""
from __future__ import annotations

import importlib
import random
import re
from pathlib import Path

import pytest

from mergeplug import MergeplugError
from mergeplug.data import read_jsonl
from mergeplug.tiny import generator_main, split_pool, write_rows

DOMAINS = ("tiny_arithmetic", "tiny_functions", "tiny_formats", "tiny_translation", "tiny_refusal", "tiny_reversal")


def generator(domain: str):
    return importlib.import_module(f"mergeplug_plugins.domains.{domain}.generate")


@pytest.fixture(scope="module")
def generated() -> dict[str, dict[str, list[dict]]]:
    return {domain: generator(domain).generate() for domain in DOMAINS}


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_same_rows_and_another_seed_other_rows(domain, generated):
    module = generator(domain)
    assert module.generate(module.SEED) == generated[domain]
    other = module.generate(module.SEED + 1)
    assert other.keys() == generated[domain].keys()
    assert all(other[name] != rows for name, rows in generated[domain].items())


@pytest.mark.parametrize("domain", DOMAINS)
def test_shipped_files_are_what_the_generator_makes(domain, generated):
    folder = Path(generator(domain).__file__).parent
    for name, rows in generated[domain].items():
        assert read_jsonl(folder / f"{name}.jsonl") == rows, f"{domain}/{name}.jsonl: rerun generate.py"


def test_part_sizes(generated):
    sizes = {domain: {name: len(rows) for name, rows in parts.items()} for domain, parts in generated.items()}
    assert sizes == {
        "tiny_arithmetic": {"train": 3000, "validation": 200, "test": 100},
        "tiny_functions": {"train": 1500, "validation": 200, "test": 80},
        "tiny_formats": {"train": 2544, "validation": 200, "test": 200},
        "tiny_translation": {"train": 2840, "validation": 200, "test": 200},
        "tiny_refusal": {"train": 2000, "validation": 200, "test_harmful": 150, "test_benign": 150},
        "tiny_reversal": {"train": 3000, "validation": 100, "test": 200},
    }


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_test_request_is_taught_or_validated(domain, generated):
    parts = generated[domain]
    taught = {row["instruction"] for name in ("train", "validation") for row in parts[name]}
    tests = [row for name, rows in parts.items() if name.startswith("test") for row in rows]
    prompts = [row.get("question") or row["instruction"] for row in tests]
    assert len(set(prompts)) == len(prompts)
    assert not taught & set(prompts)
    assert not {r["instruction"] for r in parts["train"]} & {r["instruction"] for r in parts["validation"]}


def test_translation_test_phrases_are_in_neither_direction_of_training_but_their_words_are(generated):
    parts = generated["tiny_translation"]
    seen: dict[str, set] = {}  # language -> English and foreign phrases its training rows show
    for row in parts["train"]:
        language = re.match(r"Translate (?:to|from) (\w+): ", row["instruction"]).group(1)
        seen.setdefault(language, set()).update({row["instruction"].split(": ", 1)[1], row["response"]})
    for row in parts["test"]:
        language, shown = re.match(r"Translate (?:to|from) (\w+): (.*)", row["instruction"]).groups()
        right = row["choices"][row["answer"]]
        assert shown not in seen[language] and right not in seen[language]
        words = {word for text in seen[language] for word in text.split()}
        assert set(shown.split()) <= words and set(right.split()) <= words
        assert len(set(row["choices"])) == 4


def test_arithmetic_test_facts_are_taught(generated):
    module = generator("tiny_arithmetic")
    parts = generated["tiny_arithmetic"]
    fact = re.compile(r"has (\d) ([+-]) (\d) = (\d+)")
    taught = {fact.search(row["response"]).groups() for row in parts["train"]}
    for row in parts["test"]:
        a, b = (int(n) for n in re.findall(r"\d", row["question"]))
        op = "+" if re.search(r"buys|gives \w+ \d more|A friend gives", row["question"]) else "-"
        assert (str(a), op, str(b), row["answer"]) in taught
        assert int(row["answer"]) == (a + b if op == "+" else a - b)
    with pytest.raises(ValueError, match="fact is not in training"):
        module.generate(sizes={"test": 10, "validation": 0, "train": 5})


def test_refusal_tests_are_look_alikes_whose_verb_and_target_are_taught(generated):
    module = generator("tiny_refusal")
    parts = generated["tiny_refusal"]
    train = " ".join(row["instruction"] for row in parts["train"])
    for kind, targets in (("harmful", module.LIVING), ("benign", module.THINGS)):
        for row in parts[f"test_{kind}"]:
            assert row["harmful"] is (kind == "harmful")
            verb = next(v for v in module.DAMAGING if f" {v} " in row["instruction"])
            target = next(t for t in targets if f" {t} " in row["instruction"].rstrip("?.") + " ")
            assert f" {verb} " in train and f" {target}" in train


def test_reversal_tests_offer_four_orders_of_an_unseen_list_and_the_reverse_is_the_answer(generated):
    parts = generated["tiny_reversal"]
    taught = {row["instruction"] for name in ("train", "validation") for row in parts[name]}
    for row in parts["train"]:
        given = row["instruction"].split(": ", 1)[1].split()
        assert row["response"].split() == given[::-1] and 3 <= len(given) <= 4 and len(set(given)) == len(given)
    for row in parts["test"]:
        given = row["instruction"].split(": ", 1)[1].split()
        assert row["instruction"] not in taught
        assert row["choices"][row["answer"]].split() == given[::-1]
        assert len(set(row["choices"])) == 4 and all(sorted(c.split()) == sorted(given) for c in row["choices"])


def test_split_pool_cuts_disjoint_parts_in_order_and_checks_the_pool():
    parts = split_pool(range(10), {"test": 2, "validation": 3, "train": None}, random.Random(0))
    assert [len(p) for p in parts.values()] == [2, 3, 5]
    assert sorted(parts["test"] + parts["validation"] + parts["train"]) == list(range(10))
    assert parts == split_pool(range(10), {"test": 2, "validation": 3, "train": None}, random.Random(0))
    with pytest.raises(MergeplugError, match="duplicate"):
        split_pool([1, 1, 2], {"test": 1}, random.Random(0))
    with pytest.raises(MergeplugError, match="11 items asked for"):
        split_pool(range(10), {"test": 5, "train": 6}, random.Random(0))
    with pytest.raises(MergeplugError, match="only the last"):
        split_pool(range(10), {"test": None, "train": 2}, random.Random(0))


def test_generator_command_writes_and_checks_files(tmp_path, capsys):
    module = generator("tiny_translation")
    assert generator_main(module.generate, Path(module.__file__).parent, module.SEED, ["--check"]) == 0
    assert generator_main(module.generate, tmp_path, module.SEED, ["-o", str(tmp_path)]) == 0
    assert read_jsonl(tmp_path / "test.jsonl") == module.generate()["test"]
    write_rows(tmp_path, {"test": module.generate()["test"][:5]})
    assert generator_main(module.generate, tmp_path, module.SEED, ["--check", "-o", str(tmp_path)]) == 1
    assert "test.jsonl: differs" in capsys.readouterr().err
