"""Random search (Bergstra and Bengio, "Random Search for Hyper-Parameter Optimization", JMLR 13, 2012).

Point k is drawn from one ``random.Random(search.seed)`` stream, one draw u in [0, 1) per dimension in declared
order (Python's Mersenne Twister: the same seed gives the same points on every platform):

- a list of n values: ``values[floor(u * n)]``;
- a range [low, high]: ``low + u * (high - low)``; with ``log: true``, ``exp(log low + u * (log high - log low))``
  (log-uniform, for scales spanning decades);
- an integer parameter's range: ``low + floor(u * (high - low + 1))`` (uniform over the integers; with log,
  the log-uniform draw rounded and kept within [low, high]).

With ``distinct`` (the default) a point equal to an earlier one is drawn again, and the search ends early when
the lists allow no new combination.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

from mergeplug.tuning import Dimension, SearchStrategy, Trial, parameters_key


def draw(dim: Dimension, u: float):
    """The value of ``dim`` for the uniform draw ``u`` in [0, 1)."""
    if not dim.is_range:
        return dim.values[min(int(u * len(dim.values)), len(dim.values) - 1)]
    low, high = dim.low, dim.high
    if dim.log:
        value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        return min(max(round(value), math.ceil(low)), math.floor(high)) if dim.integer else value
    if dim.integer:
        low, high = math.ceil(low), math.floor(high)
        return low + min(int(u * (high - low + 1)), high - low)
    return low + u * (high - low)


class RandomSearch(SearchStrategy):
    needs_trials = True

    def __init__(self, space: Sequence[Dimension], seed: int, parameters: dict, trials: int | None = None):
        super().__init__(space, seed, parameters, trials)
        self.rng = random.Random(self.seed)
        self.points: list[dict] = []
        self.seen: set[str] = set()
        self.distinct = bool(self.parameters.get("distinct", True))
        # How many different points exist (None: a range makes them uncountable).
        self.combinations = None if any(d.is_range for d in self.space) else \
            math.prod(len(set(map(repr, d.values))) for d in self.space)
        self.exhausted = False

    def _next_point(self) -> dict | None:
        while True:
            if self.distinct and self.combinations is not None and len(self.seen) >= self.combinations:
                return None
            point = {dim.name: draw(dim, self.rng.random()) for dim in self.space}
            key = parameters_key(point)
            if not self.distinct or key not in self.seen:
                self.seen.add(key)
                return point

    def propose(self, trials: Sequence[Trial]) -> dict | None:
        index = len(trials)
        if self.trials is not None and index >= self.trials:
            return None
        # Points depend only on the seed and their index: a resumed search sees the same sequence.
        while len(self.points) <= index and not self.exhausted:
            point = self._next_point()
            if point is None:
                self.exhausted = True
            else:
                self.points.append(point)
        return self.points[index] if index < len(self.points) else None
