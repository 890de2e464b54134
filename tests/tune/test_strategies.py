"""The grid and random strategies: their proposals equal the sequences computed by hand."""
from __future__ import annotations

import math
import random

import pytest

from mergeplug import MergeplugError
from mergeplug.plugins import Registry
from mergeplug.tuning import Dimension, Trial, parameters_key, run_search
from mergeplug_plugins.strategies.grid.strategy import GridSearch
from mergeplug_plugins.strategies.random.strategy import RandomSearch


def proposals(strategy, limit=1000):
    """Every point the strategy proposes, feeding each back as a finished trial."""
    trials = []
    while len(trials) < limit:
        point = strategy.propose(trials)
        if point is None:
            break
        trials.append(Trial(len(trials) + 1, point, parameters_key(point), objective=0.0))
    return [t.parameters for t in trials]


def test_registered_through_the_real_plugin_manager():
    registry = Registry()
    assert registry.get("strategy", "grid").load() is GridSearch
    assert registry.get("strategy", "random").load() is RandomSearch
    assert registry.get("strategy", "grid").parameters["properties"]["shuffle"]["default"] is False
    assert registry.get("strategy", "random").parameters["properties"]["distinct"]["default"] is True


def test_grid_is_the_cartesian_product_in_declared_order():
    space = [Dimension("lambda", values=(0.2, 0.4)), Dimension("models.0.weight", values=(1, 2, 3))]
    got = proposals(GridSearch(space, 42, {"shuffle": False}))
    assert got == [
        {"lambda": 0.2, "models.0.weight": 1}, {"lambda": 0.2, "models.0.weight": 2},
        {"lambda": 0.2, "models.0.weight": 3}, {"lambda": 0.4, "models.0.weight": 1},
        {"lambda": 0.4, "models.0.weight": 2}, {"lambda": 0.4, "models.0.weight": 3},
    ]
    assert GridSearch(space, 42, {"shuffle": False}).size() == 6
    capped = run_search(GridSearch(space, 42, {"shuffle": False}, trials=4),
                        lambda n, p: Trial(n, p, parameters_key(p), objective=0.0), max_trials=4)
    assert [t.parameters for t in capped] == got[:4]
    assert GridSearch(space, 42, {"shuffle": False}, trials=4).size() == 4


def test_grid_of_one_dimension_and_of_a_single_point():
    assert proposals(GridSearch([Dimension("lambda", values=(0.0, 0.5, 1.0))], 0, {})) == \
        [{"lambda": 0.0}, {"lambda": 0.5}, {"lambda": 1.0}]
    assert proposals(GridSearch([Dimension("a", values=("x",)), Dimension("b", values=(7,))], 0, {})) == \
        [{"a": "x", "b": 7}]


def test_shuffled_grid_is_the_same_points_in_a_seeded_order():
    space = [Dimension("a", values=(1, 2)), Dimension("b", values=(10, 20, 30))]
    declared = proposals(GridSearch(space, 7, {"shuffle": False}))
    order = list(range(6))
    random.Random(7).shuffle(order)  # the documented draw: the product's indices shuffled with the seed
    shuffled = proposals(GridSearch(space, 7, {"shuffle": True}))
    assert shuffled == [declared[i] for i in order]
    assert shuffled == proposals(GridSearch(space, 7, {"shuffle": True}))
    assert shuffled != declared and sorted(map(str, shuffled)) == sorted(map(str, declared))


def test_grid_refuses_a_range():
    with pytest.raises(MergeplugError, match=r"lambda is a range .*grid search needs a list of values"):
        GridSearch([Dimension("lambda", low=0.0, high=1.0)], 0, {})


def test_random_draws_follow_the_documented_formulas():
    space = [Dimension("w", values=(0.1, 0.2, 0.3, 0.4)), Dimension("lambda", low=0.0, high=2.0),
             Dimension("density", low=1e-3, high=1e-1, log=True), Dimension("k", low=1, high=3, integer=True)]
    got = proposals(RandomSearch(space, 3, {"distinct": True}, trials=5))
    rng = random.Random(3)
    expected = []
    for _ in range(5):
        u = [rng.random() for _ in range(4)]
        expected.append({
            "w": (0.1, 0.2, 0.3, 0.4)[int(u[0] * 4)],
            "lambda": 2.0 * u[1],
            "density": math.exp(math.log(1e-3) + u[2] * (math.log(1e-1) - math.log(1e-3))),
            "k": 1 + int(u[3] * 3),
        })
    assert got == expected
    assert proposals(RandomSearch(space, 3, {"distinct": True}, trials=5)) == got  # seeded: the same again
    assert proposals(RandomSearch(space, 4, {"distinct": True}, trials=5)) != got


def test_random_values_stay_in_bounds_and_log_uniform_spreads_over_decades():
    space = [Dimension("lambda", low=0.25, high=0.75), Dimension("eps", low=1e-4, high=1.0, log=True),
             Dimension("k", low=2, high=4, integer=True)]
    got = proposals(RandomSearch(space, 0, {"distinct": True}, trials=400))
    assert len(got) == 400
    assert all(0.25 <= p["lambda"] < 0.75 for p in got)
    assert all(1e-4 <= p["eps"] <= 1.0 for p in got)
    assert {p["k"] for p in got} == {2, 3, 4}
    # Log-uniform over four decades: about a quarter of the draws in each decade (uniform would put ~90% in the last).
    below = sum(p["eps"] < 1e-3 for p in got) / len(got)
    assert 0.18 < below < 0.32
    last_decade = sum(p["eps"] >= 0.1 for p in got) / len(got)
    assert 0.18 < last_decade < 0.32


def test_random_over_lists_draws_distinct_points_and_stops_when_all_are_drawn():
    space = [Dimension("a", values=(1, 2)), Dimension("b", values=("x", "y"))]
    got = proposals(RandomSearch(space, 11, {"distinct": True}, trials=10))
    rng, seen, expected = random.Random(11), set(), []
    while len(expected) < 4:  # redraw repeats, as documented
        point = {"a": (1, 2)[int(rng.random() * 2)], "b": ("x", "y")[int(rng.random() * 2)]}
        if str(point) not in seen:
            seen.add(str(point))
            expected.append(point)
    assert got == expected
    independent = proposals(RandomSearch(space, 11, {"distinct": False}, trials=10))
    assert len(independent) == 10 and len({str(p) for p in independent}) < 10


def test_random_needs_trials():
    assert RandomSearch.needs_trials and not GridSearch.needs_trials
