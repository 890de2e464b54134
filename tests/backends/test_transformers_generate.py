"""Generation by the transformers backend against a one-prompt argmax loop written by hand."""
from __future__ import annotations

import warnings

import pytest

from mergeplug import MergeplugError
from mergeplug.evaluation import Generate

EOS = 3  # the tiny tokenizer's </s>

PROMPTS = [
    "Question: what is 12 plus 30? Answer:",
    "def add(a, b):",
    "Merging combines the weights of several finetuned models into one model. Task arithmetic adds",
    "Hola",
    "The quick brown fox jumps over the lazy dog",
]


def count_forward_calls(backend):
    calls = []
    handle = backend._model.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_batched_greedy_equals_the_one_prompt_argmax_loop(open_tiny, reference, batch_size):
    # Prompts of 2 to 30 tokens in one batch: equal outputs prove that left padding and the KV cache are right.
    lengths = [len(reference.ids(p)) for p in PROMPTS]
    assert max(lengths) - min(lengths) >= 10
    backend = open_tiny(batch_size=batch_size)
    answers = backend.generate([Generate(p, max_new_tokens=12) for p in PROMPTS])
    expected = [[reference.greedy_text(p, 12)] for p in PROMPTS]
    assert answers == expected
    assert all(a[0] for a in answers)


def test_max_new_tokens_is_respected_and_order_kept_across_groups_and_sorted_batches(open_tiny, reference):
    # Settings interleaved, so grouping and length sorting both reorder; answers must come back in request order.
    budgets = [3, 9, 1, 6, 9]
    requests = [Generate(p, max_new_tokens=n) for p, n in zip(PROMPTS, budgets)]
    backend = open_tiny(batch_size=2)
    calls, handle = count_forward_calls(backend)
    answers = backend.generate(requests)
    handle.remove()
    steps: dict[int, int] = {}
    for prompt, n, answer in zip(PROMPTS, budgets, answers):
        new_ids = reference.greedy_ids(reference.ids(prompt), n)
        assert len(new_ids) == n or new_ids[-1] == EOS
        assert answer == [reference.tokenizer.decode(new_ids, skip_special_tokens=True)]
        steps[n] = max(steps.get(n, 0), len(new_ids))
    assert [len(reference.greedy_ids(reference.ids(p), n)) for p, n in zip(PROMPTS, budgets)] == [2, 9, 1, 6, 9]
    # Each budget is one batch (at most 2 prompts), which runs one forward pass per new token of its longest row.
    assert len(calls) == sum(steps.values()) == 2 + 9 + 1 + 6


def test_generation_stops_at_eos(open_tiny, reference):
    assert reference.greedy_ids(reference.ids(PROMPTS[0]), 10) == [150, EOS]  # this prompt's greedy path ends at once
    backend = open_tiny()
    calls, handle = count_forward_calls(backend)
    assert backend.generate([Generate(PROMPTS[0], max_new_tokens=10)]) == [["ds,"]]
    handle.remove()
    assert len(calls) == 2


def test_stop_sequences_cut_the_text_and_end_the_batch_early(open_tiny, reference):
    prompts = [PROMPTS[1], PROMPTS[4]]
    full = [reference.greedy_text(p, 30) for p in prompts]
    # A stop string from early in each row's text (3 characters from character 6 on): both rows stop soon.
    stops = tuple(text[6:9] for text in full)
    assert all(len(s) == 3 for s in stops)
    backend = open_tiny(batch_size=4)
    calls, handle = count_forward_calls(backend)
    answers = backend.generate([Generate(p, max_new_tokens=30, stop=stops) for p in prompts])
    handle.remove()
    expected = [[text[:min(i for i in (text.find(s) for s in stops) if i != -1)]] for text in full]
    assert answers == expected
    assert all(len(a[0]) <= 6 for a in answers)
    assert len(calls) < 30  # the batch ended once both rows had hit a stop, not at max_new_tokens


def test_a_stop_string_that_never_appears_changes_nothing(open_tiny, reference):
    backend = open_tiny()
    answers = backend.generate([Generate(PROMPTS[0], max_new_tokens=10, stop=("@@@never@@@",))])
    assert answers == [[reference.greedy_text(PROMPTS[0], 10)]]


def test_sampling_is_reproducible_from_the_seed_and_gives_samples_texts(open_tiny):
    backend = open_tiny(batch_size=8)
    requests = [Generate(p, max_new_tokens=10, temperature=1.0, top_p=0.9, samples=3, seed=7) for p in PROMPTS[:3]]
    first = backend.generate(requests)
    again = backend.generate(requests)
    assert first == again
    assert [len(a) for a in first] == [3, 3, 3]
    assert all(len(set(a)) > 1 for a in first)  # three samples of a near-uniform model differ
    other_seed = backend.generate([Generate(PROMPTS[0], max_new_tokens=10, temperature=1.0, top_p=0.9, samples=3,
                                            seed=8)])
    assert other_seed[0] != first[0]
    # The global RNG is left alone: sampling is seeded in its own scope.
    import torch

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    backend.generate(requests[:1])
    assert torch.equal(torch.rand(1), before)


def test_greedy_with_several_samples_repeats_the_greedy_text(open_tiny, reference):
    backend = open_tiny()
    answers = backend.generate([Generate(PROMPTS[1], max_new_tokens=8, samples=3)])
    assert answers == [[reference.greedy_text(PROMPTS[1], 8)] * 3]


def test_ignore_eos_generates_exactly_max_new_tokens(open_tiny):
    backend = open_tiny(ignore_eos=True)
    calls, handle = count_forward_calls(backend)
    backend.generate([Generate(PROMPTS[0], max_new_tokens=7)])
    handle.remove()
    assert len(calls) == 7


def test_a_long_prompt_is_cut_from_the_left_with_one_warning(open_tiny, reference):
    long_prompt = " ".join(PROMPTS * 3)
    ids = reference.ids(long_prompt)
    backend = open_tiny(max_length=24)
    assert len(ids) > 24 - 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = backend.generate([Generate(long_prompt, max_new_tokens=5), Generate(long_prompt + "!", max_new_tokens=5)])
    cut_warnings = [w for w in caught if "cut from the left" in str(w.message)]
    assert len(cut_warnings) == 1
    kept = ids[-(24 - 5):]
    expected = reference.tokenizer.decode(reference.greedy_ids(kept, 5), skip_special_tokens=True)
    assert answers[0] == [expected]


def test_bad_generation_settings_are_user_errors(open_tiny):
    backend = open_tiny(max_length=16)
    with pytest.raises(MergeplugError, match="max_new_tokens 16 leaves no room"):
        backend.generate([Generate("hi", max_new_tokens=16)])
    with pytest.raises(MergeplugError, match="top_p must be in"):
        backend.generate([Generate("hi", max_new_tokens=2, temperature=1.0, top_p=0.0)])
    with pytest.raises(MergeplugError, match="samples must be a positive integer"):
        backend.generate([Generate("hi", max_new_tokens=2, samples=0)])


def test_an_empty_prompt_starts_from_bos(open_tiny, reference):
    backend = open_tiny()
    expected = reference.tokenizer.decode(reference.greedy_ids([2], 6), skip_special_tokens=True)
    assert backend.generate([Generate("", max_new_tokens=6)]) == [[expected]]
