"""multiple_choice: acc and acc_norm from per-choice log-likelihoods, as lm-evaluation-harness (arXiv:2405.14782)."""
from pathlib import Path

import pytest

import mergeplug_plugins.evaluators.multiple_choice as plugin_package
from mergeplug import MergeplugError
from mergeplug.evaluation import Loglikelihood, LoglikelihoodResult, load_metric
from mergeplug.plugins import Registry
from mergeplug.schema import defaults
from mergeplug_plugins.evaluators.multiple_choice.scoring import gold_index

METRIC_FILE = Path(plugin_package.__file__).with_name("multiple_choice_metric.py")
CHOICES = ["Paris", "the city of Lyon in France"]  # continuations " Paris" (6 bytes) and 27 bytes


def results(*logprobs):
    return [LoglikelihoodResult(logprob=lp, tokens=3, greedy=False) for lp in logprobs]


@pytest.fixture(scope="module")
def component():
    return Registry().get("evaluator", "multiple_choice")


@pytest.fixture
def make(component):
    def build(**parameters):
        return component.load()(**{**defaults(component.parameters), **parameters})

    return build


def test_registered_through_the_plugin_manager(component):
    cls = component.load()
    assert cls.__name__ == "MultipleChoice" and cls.metrics == ("acc", "acc_norm")
    assert defaults(component.parameters) == {"continuation": " {choice}", "length_unit": "characters"}
    assert component.reference == "arXiv:2405.14782"


def test_one_loglikelihood_request_per_choice(make):
    sample = {"choices": CHOICES, "answer": 1}
    assert make().requests(sample, "Q: capital?\nA:", {}) == [
        Loglikelihood("Q: capital?\nA:", " Paris"),
        Loglikelihood("Q: capital?\nA:", " the city of Lyon in France"),
    ]
    lettered = make(continuation=" {letter}").requests(sample, "Answer:", {})
    assert [r.continuation for r in lettered] == [" A", " B"]


def test_acc_and_acc_norm_disagree(make):
    # raw: -6 > -9 picks Paris; per byte: -6/6 = -1.0 < -9/27 = -0.333 picks the long choice
    scored = make(length_unit="bytes").score({"choices": CHOICES, "answer": 1}, results(-6.0, -9.0))
    assert scored.scores == {"acc": 0.0, "acc_norm": 1.0}
    assert scored.details["pred"] == 0 and scored.details["pred_norm"] == 1 and scored.details["lengths"] == [6, 27]
    scored = make(length_unit="bytes").score({"choices": CHOICES, "answer": 0}, results(-6.0, -9.0))
    assert scored.scores == {"acc": 1.0, "acc_norm": 0.0}


def test_bytes_and_characters_differ_on_non_ascii_text(make):
    sample = {"choices": ["жар", "heat"], "answer": 1}
    # bytes: " жар" = 7, " heat" = 5 -> -7/7 = -1.0 beats -5.5/5 = -1.1 (picks 0)
    # characters (lm-eval v0.4: len(choice)): -7/3 = -2.33 loses to -5.5/4 = -1.375 (picks 1)
    assert make(length_unit="bytes").score(sample, results(-7.0, -5.5)).scores == {"acc": 1.0, "acc_norm": 0.0}
    # The default is characters: lm-evaluation-harness v0.4's len(choice).
    by_characters = make().score(sample, results(-7.0, -5.5))
    assert by_characters.scores == {"acc": 1.0, "acc_norm": 1.0}
    assert by_characters.details["lengths"] == [3, 4]


def test_ties_go_to_the_first_choice_like_numpy_argmax(make):
    scored = make().score({"choices": ["ab", "cd"], "answer": 1}, results(-2.0, -2.0))
    assert scored.scores == {"acc": 0.0, "acc_norm": 0.0}


def test_gold_as_index_letter_text_or_digit_string():
    choices = ["red", "green", "blue", "B"]
    assert gold_index(2, choices) == 2
    assert gold_index("C", choices) == 2
    assert gold_index("green", choices) == 1
    assert gold_index("B", choices) == 3  # a choice's own text wins over the letter
    assert gold_index("1", choices) == 1  # HellaSwag stores labels as strings
    for bad in (4, -1, "E", "purple", None, True):
        with pytest.raises(MergeplugError, match="gold answer"):
            gold_index(bad, choices)


def test_bad_input_is_a_clear_error(make):
    with pytest.raises(MergeplugError, match="length_unit"):
        make(length_unit="tokens")
    with pytest.raises(MergeplugError, match="continuation"):
        make(continuation=" {text}")
    with pytest.raises(MergeplugError, match="choices"):
        make().requests({"choices": "Paris", "answer": 0}, "Q", {})
    with pytest.raises(MergeplugError, match="2 log-likelihood results"):
        make().score({"choices": CHOICES, "answer": 0}, results(-1.0))


def test_the_metric_module_loads_by_path_and_gives_the_evaluators_numbers(make, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = load_metric(METRIC_FILE)
    questions = [
        ({"choices": CHOICES, "answer": 1}, (-6.0, -9.0)),
        ({"choices": CHOICES, "answer": 0}, (-6.0, -9.0)),
        ({"choices": ["yes", "no"], "answer": "yes"}, (-1.0, -3.0)),
        ({"choices": ["yes", "no"], "answer": "B"}, (-1.0, -3.0)),
    ]
    evaluator = make()
    scored = [evaluator.score(sample, results(*lps)) for sample, lps in questions]
    computed = metric.compute(
        predictions=[list(lps) for _, lps in questions],
        references=[s.details["gold"] for s in scored],
        lengths=[s.details["lengths"] for s in scored],
    )
    assert computed == {"acc": 0.5, "acc_norm": 0.5}
    assert {name: m.value for name, m in evaluator.aggregate(scored).items()} == computed
    assert metric.compute(predictions=[[-1.0, -3.0]], references=[0]) == {"acc": 1.0}
