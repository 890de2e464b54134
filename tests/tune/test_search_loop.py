"""The search loop on synthetic objectives: argmax recovery, resume from the trials file, failures."""
from __future__ import annotations

import json
import math

from mergeplug import MergeplugError
from mergeplug.tuning import Dimension, SearchStrategy, Trial, TrialStore, best_trial, parameters_key, run_search
from mergeplug_plugins.strategies.grid.strategy import GridSearch
from mergeplug_plugins.strategies.random.strategy import RandomSearch


def synthetic(f, calls=None):
    """An evaluate() whose objective is f(parameters): no model involved."""
    def evaluate(number, parameters):
        if calls is not None:
            calls.append(dict(parameters))
        return Trial(number, parameters, parameters_key(parameters), objective=f(**parameters))
    return evaluate


def bowl(x, y):
    return -(x - 0.3) ** 2 - (y + 1.0) ** 2


def test_grid_search_recovers_the_argmax_of_a_known_function():
    space = [Dimension("x", values=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5)), Dimension("y", values=(-2.0, -1.0, 0.0))]
    trials = run_search(GridSearch(space, 42, {}), synthetic(bowl))
    assert len(trials) == 18
    best = best_trial(trials)
    assert best.parameters == {"x": 0.3, "y": -1.0} and best.objective == 0.0
    assert [t.number for t in trials] == list(range(1, 19))


def test_random_search_gets_close_to_the_argmax_of_a_known_function():
    space = [Dimension("x", low=0.0, high=1.0), Dimension("y", low=-2.0, high=0.0)]
    trials = run_search(RandomSearch(space, 42, {}, trials=300), synthetic(bowl), max_trials=300)
    best = best_trial(trials)
    assert len(trials) == 300
    assert abs(best.parameters["x"] - 0.3) < 0.06 and abs(best.parameters["y"] + 1.0) < 0.06
    assert best.objective == max(bowl(**t.parameters) for t in trials)


def test_resume_runs_no_recorded_trial_again(tmp_path):
    space = [Dimension("x", values=(0.1, 0.3, 0.5))]
    calls = []
    first = run_search(GridSearch(space, 42, {}), synthetic(lambda x: -abs(x - 0.3), calls),
                       store=TrialStore(tmp_path / "trials.jsonl"))
    assert len(calls) == 3
    lines = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [line["parameters"] for line in lines] == [{"x": 0.1}, {"x": 0.3}, {"x": 0.5}]
    again = run_search(GridSearch(space, 42, {}), synthetic(lambda x: -abs(x - 0.3), calls),
                       store=TrialStore(tmp_path / "trials.jsonl"))
    assert len(calls) == 3, "every point was recorded: nothing runs"
    assert [t.record() for t in again] == [t.record() for t in first]
    # A larger space: only the new point runs, numbered after the recorded ones.
    bigger = [Dimension("x", values=(0.1, 0.3, 0.5, 0.2))]
    third = run_search(GridSearch(bigger, 42, {}), synthetic(lambda x: -abs(x - 0.3), calls),
                       store=TrialStore(tmp_path / "trials.jsonl"))
    assert calls[3:] == [{"x": 0.2}] and third[-1].number == 4


def test_a_torn_last_line_runs_that_trial_again(tmp_path):
    path = tmp_path / "trials.jsonl"
    calls = []
    run_search(GridSearch([Dimension("x", values=(1, 2))], 0, {}), synthetic(lambda x: x, calls),
               store=TrialStore(path))
    text = path.read_text()
    path.write_text(text[: len(text) - 20])  # an interrupted write
    run_search(GridSearch([Dimension("x", values=(1, 2))], 0, {}), synthetic(lambda x: x, calls),
               store=TrialStore(path))
    assert calls == [{"x": 1}, {"x": 2}, {"x": 2}]


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path):
    def f(x):
        if x == 0.2:
            raise MergeplugError("trial: tensor w: something broke")
        if x == 0.4:
            raise ZeroDivisionError("division by zero")
        return x

    store = TrialStore(tmp_path / "trials.jsonl")
    trials = run_search(GridSearch([Dimension("x", values=(0.1, 0.2, 0.3, 0.4))], 0, {}), synthetic(f), store=store)
    assert [t.status for t in trials] == ["ok", "failed", "ok", "failed"]
    assert trials[1].error == "trial: tensor w: something broke" and trials[1].objective is None
    assert trials[3].error == "ZeroDivisionError: division by zero"
    assert best_trial(trials).parameters == {"x": 0.3}
    calls = []
    run_search(GridSearch([Dimension("x", values=(0.1, 0.2, 0.3, 0.4))], 0, {}), synthetic(lambda x: x, calls),
               store=TrialStore(tmp_path / "trials.jsonl"), retry_failed=True)
    assert calls == [{"x": 0.2}, {"x": 0.4}], "retry_failed runs only the failed points"


class HillClimb(SearchStrategy):
    """An adaptive strategy: steps right while the objective improves (it reads the trials it is given)."""

    def propose(self, trials):
        if not trials:
            return {"x": 0.0}
        if len(trials) >= 2 and trials[-1].objective <= trials[-2].objective:
            return None
        return {"x": round(trials[-1].parameters["x"] + 0.1, 10)}


def test_strategies_see_every_trial_with_its_objective():
    trials = run_search(HillClimb([Dimension("x", low=0.0, high=1.0)], 0, {}), synthetic(lambda x: -(x - 0.5) ** 2))
    assert [t.parameters["x"] for t in trials] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert best_trial(trials).parameters == {"x": 0.5}
    assert math.isclose(best_trial(trials).objective, 0.0, abs_tol=1e-12)
