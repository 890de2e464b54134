"""Training examples: loss on response tokens only, packing that keeps every example's labels and attention to
itself, padding, the mixture and its weights, and which local data replaces which training set."""
from __future__ import annotations

import pytest
import torch

from mergeplug.data import ALPACA_NO_INPUT, resolve_domains
from mergeplug.errors import MergeplugError
from mergeplug.finetuning import (IGNORE_INDEX, Collator, TrainingSet, load_training_sets, mixture, pack_examples,
                                  tokenize_examples)

EOS, PAD = 3, 1  # the tiny tokenizer's </s> and <pad>


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.base))


@pytest.fixture(scope="module")
def math():
    return resolve_domains("math")[0]


def test_labels_mask_the_prompt_and_end_with_eos(tokenizer, math):
    row = {"instruction": "What is 12 plus 30?", "response": "The answer is 42."}
    [example] = tokenize_examples([(math, row)], tokenizer, 512)
    prompt_ids = tokenizer(ALPACA_NO_INPUT.format(instruction=row["instruction"]))["input_ids"]
    response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt_ids + response_ids + [EOS]
    batch = Collator(PAD)([example])
    labels = batch["labels"][0].tolist()
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [EOS]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "The answer is 42.</s>"
    assert batch["position_ids"][0].tolist() == list(range(len(prompt_ids) + len(response_ids) + 1))
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: positions carry segments


def test_truncation_keeps_the_head_and_drops_examples_left_without_a_response(tokenizer, math):
    row = {"instruction": "What is 12 plus 30?", "response": "The answer is 42."}
    prompt_len = len(tokenizer(ALPACA_NO_INPUT.format(instruction=row["instruction"]))["input_ids"])
    [cut] = tokenize_examples([(math, row)], tokenizer, prompt_len + 2)
    assert len(cut["input_ids"]) == prompt_len + 2
    assert cut["labels"][-2:] == cut["input_ids"][-2:] and set(cut["labels"][:-2]) == {IGNORE_INDEX}
    assert tokenize_examples([(math, row)], tokenizer, prompt_len) == []


def test_packing_concatenates_whole_examples_and_restarts_positions():
    a = {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}
    b = {"input_ids": [20, 21, 22, 23], "labels": [-100, -100, 22, 23]}
    c = {"input_ids": [30, 31, 32, 33, 34], "labels": [-100, 31, 32, 33, 34]}
    packed = pack_examples([a, b, c], 8)
    assert packed == [
        {"input_ids": [10, 11, 12, 20, 21, 22, 23], "labels": [-100, 11, 12, -100, -100, 22, 23],
         "position_ids": [0, 1, 2, 0, 1, 2, 3]},
        {"input_ids": [30, 31, 32, 33, 34], "labels": [-100, 31, 32, 33, 34], "position_ids": [0, 1, 2, 3, 4]},
    ]
    batch = Collator(PAD)(packed)
    assert batch["input_ids"].tolist()[1] == [30, 31, 32, 33, 34, PAD, PAD]
    assert batch["labels"].tolist()[1] == [-100, 31, 32, 33, 34, -100, -100]
    assert batch["position_ids"].tolist()[1] == [0, 1, 2, 3, 4, 0, 1]  # the padding is a segment of its own


def test_a_packed_example_attends_to_itself_only(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.base)).eval()
    first, second = [5, 6, 7, 8, 9], [40, 41, 42, 43]
    examples = [{"input_ids": ids, "labels": ids} for ids in (first, second)]
    batch = Collator(PAD)(pack_examples(examples, 16))
    # As in training: no KV cache (the Trainer turns it off; with one, transformers skips segment detection).
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in (first, second)]
        joined = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(packed[:5], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[5:], alone[1], rtol=1e-5, atol=1e-5)
    # the same tokens with running positions do see the first example: the restart is what separates them
    assert not torch.allclose(joined[5:], alone[1], atol=1e-3)


def test_mixture_weights_repeat_and_subsample_with_the_seed(math):
    ones = TrainingSet(math, "math.0", [{"id": i} for i in range(4)], "x", 2.0)
    halves = TrainingSet(math, "math.1", [{"id": 10 + i} for i in range(6)], "y", 0.5)
    pairs = mixture([ones, halves], seed=3)
    ids = [row["id"] for _, row in pairs]
    assert sorted(i for i in ids if i < 10) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len([i for i in ids if i >= 10]) == 3 and len(set(i for i in ids if i >= 10)) == 3
    assert ids == [row["id"] for _, row in mixture([ones, halves], seed=3)]  # seeded
    assert ids != [row["id"] for _, row in mixture([ones, halves], seed=4)]


def test_local_data_replaces_one_training_set(tmp_path, math):
    local = tmp_path / "dart.jsonl"
    local.write_text('{"query": "1+1?", "response": "2"}\n{"query": "2+2?", "response": "4"}\n')
    sets = load_training_sets([math], {"math.0": str(local)}, limit=1)
    assert [(s.label, len(s.rows)) for s in sets] == [("math.0", 1), ("math.1", 1)]
    assert sets[0].rows == [{"instruction": "1+1?", "response": "2", "id": 0}]
    assert sets[0].origin == f"files:{local}" and sets[1].origin.startswith("sample:")


@pytest.mark.parametrize("key, message", [
    ("math", "--data math: domain math has 2 training sets (hkust-nlp/dart-math-hard, AI-MO/NuminaMath-TIR); "
             "name one: math.0 to math.1"),
    ("math.2", "--data math.2: domain math has training sets math.0 to math.1"),
    ("coding", "--data coding: 'coding' is not a domain of this run (math)"),
])
def test_local_data_keys_must_name_a_training_set(tmp_path, math, key, message):
    with pytest.raises(MergeplugError) as info:
        load_training_sets([math], {key: str(tmp_path / "x.jsonl")})
    assert str(info.value) == message


def test_missing_column_is_data_loadings_one_line_error(tmp_path, math):
    local = tmp_path / "bad.jsonl"
    local.write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(MergeplugError) as info:
        load_training_sets([math], {"math.0": str(local)})
    assert str(info.value) == f"{local}: row 0 has no column 'query' (columns: question, answer)"
