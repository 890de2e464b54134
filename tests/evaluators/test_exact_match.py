"""exact_match: GSM8K strict/flexible extraction (arXiv:2110.14168), MATH boxed answers (arXiv:2103.03874)."""
from pathlib import Path

import pytest

import mergeplug_plugins.evaluators.exact_match as plugin_package
from mergeplug import MergeplugError
from mergeplug.evaluation import Generate, load_metric
from mergeplug.plugins import Registry
from mergeplug.schema import defaults
from mergeplug_plugins.evaluators.exact_match.scoring import (
    answers_match,
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    gold_answers,
    math_normalise,
)

METRIC_FILE = Path(plugin_package.__file__).with_name("exact_match_metric.py")


@pytest.fixture(scope="module")
def component():
    return Registry().get("evaluator", "exact_match")


@pytest.fixture
def make(component):
    def build(**parameters):
        return component.load()(**{**defaults(component.parameters), **parameters})

    return build


def score(evaluator, output, answer):
    return evaluator.score({"answer": answer}, [[output]]).scores


def test_registered_through_the_plugin_manager(component):
    cls = component.load()
    assert cls.__name__ == "ExactMatch"
    assert component.reference == "arXiv:2110.14168"
    assert defaults(component.parameters) == {"extract": ["gsm8k", "last_number"]}
    assert cls.metrics == ("exact_match_gsm8k", "exact_match_last_number")


def test_strict_and_flexible_differ_where_they_should(make):
    evaluator = make()
    cot = "Natalia sold 48/2 = 24 clips in May. She sold 48+24 = 72 clips. The answer is 72."
    assert score(evaluator, cot, "72") == {"exact_match_gsm8k": 1.0, "exact_match_last_number": 1.0}
    # no "The answer is": strict finds nothing, flexible takes the last number
    assert score(evaluator, "48 + 24 = 72", "72") == {"exact_match_gsm8k": 0.0, "exact_match_last_number": 1.0}
    # strict takes the stated answer although a later number disagrees; flexible takes that later number
    later = "The answer is 72. Check: 72 - 24 = 48"
    assert score(evaluator, later, "72") == {"exact_match_gsm8k": 1.0, "exact_match_last_number": 0.0}
    # strict is case-sensitive and takes no currency sign, like lm-eval's regex
    assert extract_gsm8k("the answer is 5.") is None and extract_gsm8k("The answer is $5.") is None
    assert extract_gsm8k("#### 1,234") == "1,234" and extract_gsm8k("The answer is 18") == "18"


def test_commas_dollars_and_numeric_equality(make):
    evaluator = make(extract=["last_number"])
    assert extract_last_number("So she has $1,234.50 left.") == "$1,234.50"
    assert score(evaluator, "So she has $1,234.50 left.", "1234.5") == {"exact_match_last_number": 1.0}
    assert score(evaluator, "It costs 18.00 dollars", 18) == {"exact_match_last_number": 1.0}
    assert score(evaluator, "It costs -3 now", "3") == {"exact_match_last_number": 0.0}
    assert extract_last_number("done .. ok") is None  # lm-eval's looser regex would take ".." for a number
    assert answers_match("1.0", "1") and answers_match("0.5", "1/2") and not answers_match("1.01", "1")
    assert answers_match("1,000,000", "1000000") and not answers_match("(1,2)", "(12)")


def test_gsm8k_worked_solution_is_reduced_to_its_final_number(make):
    evaluator = make()
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gold_answers(gold) == ["72"]
    assert score(evaluator, "... The answer is 72.", gold)["exact_match_gsm8k"] == 1.0


def test_boxed_with_nested_braces_and_latex_normalisation(make):
    evaluator = make(extract=["boxed"])
    output = r"First $\boxed{3}$ was wrong; so the answer is $\boxed{\dfrac{1}{\sqrt{2}}}$."
    assert extract_boxed(output) == r"\dfrac{1}{\sqrt{2}}"
    assert score(evaluator, output, r"\frac{1}{\sqrt{2}}") == {"exact_match_boxed": 1.0}
    assert extract_boxed(r"\boxed{\frac{1}{2}") is None  # cut before the box closed
    assert extract_boxed(r"so \boxed 5$") == "5"
    assert score(evaluator, r"\boxed{\frac12}", "0.5") == {"exact_match_boxed": 1.0}
    assert score(evaluator, r"\boxed{x^2 + 1}", "x^{2}+1") == {"exact_match_boxed": 1.0}
    assert score(evaluator, r"\boxed{x-5}", "x+5") == {"exact_match_boxed": 0.0}
    assert score(evaluator, r"\boxed{10\text{ cm}}", "10") == {"exact_match_boxed": 1.0}
    assert score(evaluator, r"\boxed{\left( 3, 4 \right)}", "(3,4)") == {"exact_match_boxed": 1.0}
    # a MATH solution as gold: its last boxed answer is the gold
    assert gold_answers(r"Thus $x = \boxed{-\frac{3}{4}}$.") == [r"-\frac{3}{4}"]
    assert score(evaluator, r"\boxed{-0.75}", r"so $\boxed{-\frac{3}{4}}$") == {"exact_match_boxed": 1.0}
    assert math_normalise(r"\tfrac{a}{b}^\circ") == r"\frac{a}{b}"


def test_text_answers_squad_style_and_a_list_of_acceptable_answers(make):
    evaluator = make(extract=["none"])
    assert score(evaluator, "  The Eiffel Tower. ", ["Eiffel tower"]) == {"exact_match_none": 1.0}
    assert score(evaluator, "Paris", ["Lyon", "paris", "Marseille"]) == {"exact_match_none": 1.0}
    assert score(evaluator, "Paris, France", ["paris"]) == {"exact_match_none": 0.0}


def test_several_samples_score_the_share_correct_and_details_keep_the_extractions(make):
    evaluator = make()
    scored = evaluator.score({"answer": "7"}, [["The answer is 7.", "The answer is 8.", "so 7"]])
    assert scored.scores == pytest.approx({"exact_match_gsm8k": 1 / 3, "exact_match_last_number": 2 / 3})
    assert scored.details["extracted"][2] == {"gsm8k": None, "last_number": "7"}
    assert evaluator.requests({"answer": "7"}, "Q: ...\nA:", {"max_new_tokens": 5, "stop": ["Q:"]}) == [
        Generate("Q: ...\nA:", max_new_tokens=5, stop=("Q:",))
    ]


def test_headline_follows_the_extract_order_and_aggregates(make):
    evaluator = make(extract=["last_number", "gsm8k"])
    assert evaluator.metrics == ("exact_match_last_number", "exact_match_gsm8k")
    scored = [evaluator.score({"answer": a}, [[o]]) for o, a in (("The answer is 3.", 3), ("4", 5))]
    aggregate = evaluator.aggregate(scored)
    assert list(aggregate) == ["exact_match_last_number", "exact_match_gsm8k"]
    assert aggregate["exact_match_last_number"].value == 0.5 and aggregate["exact_match_gsm8k"].n == 2


def test_bad_input_is_a_clear_error(make):
    with pytest.raises(MergeplugError, match="extract"):
        make(extract=["gsm8k", "regex"])
    with pytest.raises(MergeplugError, match="unknown parameter"):
        make(extrakt=["gsm8k"])
    with pytest.raises(MergeplugError, match="answer"):
        make().score({"answer": None}, [["The answer is 1."]])
    with pytest.raises(MergeplugError, match="answer"):
        make().score({"answer": ""}, [["The answer is 1."]])


def test_the_metric_module_loads_by_path_and_gives_the_evaluators_numbers(make, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = load_metric(METRIC_FILE)
    outputs = ["The answer is 72.", "48 + 24 = 72", "The answer is 5. Or 6", r"\boxed{7}"]
    golds = ["#### 72", "72", "5", "7"]
    results = metric.compute(predictions=outputs, references=[[g] for g in golds])
    assert results == {"exact_match_gsm8k": 0.5, "exact_match_last_number": 0.75}
    evaluator = make()
    aggregate = evaluator.aggregate([evaluator.score({"answer": g}, [[o]]) for o, g in zip(outputs, golds)])
    assert {name: metric.value for name, metric in aggregate.items()} == results
    assert metric.compute(predictions=[r"\boxed{7}"], references=[["7"]], extract=["boxed"]) == {
        "exact_match_boxed": 1.0
    }
