"""Log-likelihood scoring by the transformers backend against log_softmax sums from the model's logits."""
from __future__ import annotations

import math
import warnings

import pytest

from mergeplug.evaluation import Generate, Loglikelihood, LoglikelihoodResult

REQUESTS = [
    Loglikelihood("Question: what is 12 plus 30? Answer:", " 42."),
    Loglikelihood("The quick brown fox", " jumps over the lazy dog"),
    Loglikelihood("Hola", " que tal?"),
    Loglikelihood("Merging combines the weights of several finetuned models into one model. Task", " arithmetic"),
    Loglikelihood("def add(a, b):", "\n    return a + b\n"),
]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_logprob_is_the_sum_of_log_softmax_at_the_continuation(open_tiny, reference, batch_size):
    backend = open_tiny(batch_size=batch_size)
    results = backend.loglikelihood(REQUESTS)
    for request, result in zip(REQUESTS, results):
        context, continuation = reference.ids(request.context), reference.ids(request.continuation, special=False)
        logprob, greedy = reference.score(context, continuation)
        assert result.tokens == len(continuation)
        assert result.logprob == pytest.approx(logprob, rel=1e-5, abs=1e-5)
        assert result.greedy is greedy
        assert result.logprob < 0


def test_greedy_is_true_exactly_when_every_continuation_token_is_the_argmax(open_tiny, reference):
    context = "The quick brown fox jumps over the lazy dog"
    context_ids = reference.ids(context)
    greedy_ids = reference.greedy_ids(context_ids, 4)
    text = reference.tokenizer.decode(greedy_ids)
    assert reference.ids(text, special=False) == greedy_ids  # the argmax tokens survive a decode/encode round trip
    logprobs = reference.logprobs(context_ids + greedy_ids)
    # A continuation that leaves the argmax path at its last token: swap it for the second most likely token.
    runner_up = int(logprobs[len(context_ids) + 2].topk(2).indices[1])
    wrong_ids = greedy_ids[:3] + [runner_up]
    wrong_text = reference.tokenizer.decode(wrong_ids)
    assert reference.ids(wrong_text, special=False) == wrong_ids
    backend = open_tiny()
    on_path, off_path = backend.loglikelihood([Loglikelihood(context, text), Loglikelihood(context, wrong_text)])
    assert on_path.greedy is True and on_path.tokens == 4
    assert off_path.greedy is False and off_path.tokens == 4
    assert off_path.logprob < on_path.logprob
    assert on_path.logprob == pytest.approx(reference.score(context_ids, greedy_ids)[0], rel=1e-5)


def test_empty_context_starts_from_bos_and_empty_continuation_scores_zero(open_tiny, reference):
    backend = open_tiny()
    from_bos, empty = backend.loglikelihood([Loglikelihood("", "Hello world"), Loglikelihood("Hello", "")])
    continuation = reference.ids("Hello world", special=False)
    logprob, greedy = reference.score([2], continuation)  # <s> is 2 in the tiny tokenizer
    assert from_bos == LoglikelihoodResult(pytest.approx(logprob, rel=1e-5), len(continuation), greedy)
    assert empty == LoglikelihoodResult(0.0, 0, True)


def test_a_long_sequence_is_cut_from_the_left_to_max_length(open_tiny, reference):
    request = Loglikelihood(" ".join(r.context for r in REQUESTS), " jumps over")
    context, continuation = reference.ids(request.context), reference.ids(request.continuation, special=False)
    tokens = (context + continuation)[-(20 + 1):]  # 20 inputs, the last token only a target
    backend = open_tiny(max_length=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (result,) = backend.loglikelihood([request])
    assert any("cut from the left" in str(w.message) for w in caught)
    expected, _ = reference.score(tokens[:-len(continuation)], continuation)
    assert result.tokens == len(continuation)
    assert result.logprob == pytest.approx(expected, rel=1e-5)


def test_run_answers_mixed_requests_in_order(open_tiny, reference):
    backend = open_tiny(batch_size=3)
    requests = [REQUESTS[0], Generate("def add(a, b):", max_new_tokens=4), REQUESTS[2]]
    answers = backend.run(requests)
    assert answers[1] == [reference.greedy_text("def add(a, b):", 4)]
    for answer, request in ((answers[0], REQUESTS[0]), (answers[2], REQUESTS[2])):
        expected, _ = reference.score(reference.ids(request.context), reference.ids(request.continuation, special=False))
        assert isinstance(answer, LoglikelihoodResult) and math.isclose(answer.logprob, expected, rel_tol=1e-5)
