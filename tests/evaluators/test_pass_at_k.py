"""pass_at_k: the unbiased estimator (arXiv:2107.03374), program building, and the evaluator end to end."""
from math import comb
from pathlib import Path

import pytest

import mergeplug_plugins.evaluators.pass_at_k as plugin_package
from mergeplug import MergeplugError
from mergeplug.evaluation import Generate, load_metric
from mergeplug.plugins import Registry
from mergeplug.schema import defaults
from mergeplug_plugins.evaluators.pass_at_k.scoring import build_program, build_tests, pass_at_k, strip_fence

METRIC_FILE = Path(plugin_package.__file__).with_name("pass_at_k_metric.py")

# A HumanEval-shaped problem: the completion continues the prompt; the tests define check().
HUMANEVAL = {
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
RIGHT, WRONG = "    return a + b\n", "    return a - b\n"


@pytest.fixture(scope="module")
def component():
    return Registry().get("evaluator", "pass_at_k")


@pytest.fixture
def make(component):
    def build(**parameters):
        return component.load()(**{**defaults(component.parameters), "timeout": 5, **parameters})

    return build


def test_registered_through_the_plugin_manager(component):
    cls = component.load()
    assert cls.__name__ == "PassAtK" and cls.metrics == ("pass@1", "pass@10")
    assert component.reference == "arXiv:2107.03374"
    assert defaults(component.parameters)["k"] == [1, 10] and defaults(component.parameters)["workers"] == 2


def test_estimator_against_hand_computed_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 10) == 1.0
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - comb(3, 2) / comb(5, 2))  # 0.7
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - comb(7, 5) / comb(10, 5))  # 1 - 21/252
    assert pass_at_k(10, 8, 3) == 1.0  # fewer than k wrong samples: every k-subset holds a right one
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)  # the product form stays exact for large n
    with pytest.raises(MergeplugError, match="pass@k"):
        pass_at_k(5, 1, 6)


def test_programs_are_built_as_humaneval_and_mbpp_build_them():
    assert build_program(HUMANEVAL, RIGHT, "prompt+completion") == HUMANEVAL["prompt"] + RIGHT
    # a backend that echoes the prompt does not get it twice
    assert build_program(HUMANEVAL, HUMANEVAL["prompt"] + RIGHT, "prompt+completion") == HUMANEVAL["prompt"] + RIGHT
    assert build_tests(HUMANEVAL) == HUMANEVAL["tests"] + "\n\ncheck(add)\n"
    mbpp = {"prompt": "Write add.", "tests": "assert add(1, 2) == 3\n"}
    assert build_tests(mbpp) == "assert add(1, 2) == 3\n"  # no check(): the tests call the function
    chat = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone. ```bash\nls\n```"
    assert build_program(mbpp, chat, "completion") == "def add(a, b):\n    return a + b\n"
    assert strip_fence("```\nx = 1\n```") == "x = 1\n"
    assert strip_fence("```python\nx = 1\n") == "x = 1\n"  # cut before the closing fence
    assert strip_fence("x = 1") == "x = 1"
    with pytest.raises(MergeplugError, match="entry_point"):
        build_tests({"tests": HUMANEVAL["tests"]})
    with pytest.raises(MergeplugError, match="tests"):
        build_tests({"prompt": "x"})


def test_end_to_end_a_right_and_a_wrong_completion(make):
    evaluator = make(k=[1, 2, 5])
    assert evaluator.metrics == ("pass@1", "pass@2", "pass@5")
    scored = evaluator.score(HUMANEVAL, [[RIGHT, WRONG]])
    assert scored.scores == {"pass@1": 0.5, "pass@2": 1.0}  # pass@5 needs 5 samples: left out
    assert scored.details["n"] == 2 and scored.details["passed"] == 1
    right, wrong = scored.details["results"]
    assert right["status"] == "passed" and right["returncode"] == 0
    assert wrong["status"] == "failed" and wrong["reason"] == "AssertionError"
    assert "assert candidate(2, 3) == 5" in wrong["stderr"]
    assert evaluator.score(HUMANEVAL, [[WRONG]]).scores == {"pass@1": 0.0}
    aggregate = evaluator.aggregate([scored, evaluator.score(HUMANEVAL, [[RIGHT]])])
    assert aggregate["pass@1"].value == 0.75 and aggregate["pass@1"].n == 2 and aggregate["pass@2"].n == 1


def test_whole_program_completions_and_sampling_requests(make):
    evaluator = make(program="completion", k=[1])
    mbpp = {"prompt": "Write add.", "tests": "assert add(1, 2) == 3\n"}
    fenced = "```python\ndef add(a, b):\n    return a + b\n```"
    assert evaluator.score(mbpp, [[fenced, "def add(a, b):\n    return 3 if a else 0\n"]]).scores == {"pass@1": 1.0}
    generation = {"samples": 10, "temperature": 0.2, "top_p": 0.95, "max_new_tokens": 512}
    assert evaluator.requests(mbpp, "prompt", generation) == [
        Generate("prompt", max_new_tokens=512, temperature=0.2, top_p=0.95, samples=10)
    ]


def test_bad_parameters_are_clear_errors(make):
    with pytest.raises(MergeplugError, match="program"):
        make(program="diff")
    with pytest.raises(MergeplugError, match="`k`"):
        make(k=[0])
    with pytest.raises(MergeplugError, match="timeout"):
        make(timeout=0)
    with pytest.raises(MergeplugError, match="workers"):
        make(workers=0)
    with pytest.raises(MergeplugError, match="unknown parameter"):
        make(n=10)


def test_the_metric_module_loads_by_path_and_gives_the_evaluators_numbers(make, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = load_metric(METRIC_FILE)
    programs = [[HUMANEVAL["prompt"] + RIGHT, HUMANEVAL["prompt"] + WRONG], [HUMANEVAL["prompt"] + WRONG]]
    computed = metric.compute(predictions=programs, references=[build_tests(HUMANEVAL)] * 2, k=[1, 2], timeout=5)
    assert computed == {"pass@1": 0.25, "pass@2": 1.0}
    evaluator = make(k=[1, 2])
    scored = [evaluator.score(HUMANEVAL, [[RIGHT, WRONG]]), evaluator.score(HUMANEVAL, [[WRONG]])]
    assert {name: m.value for name, m in evaluator.aggregate(scored).items()} == computed
