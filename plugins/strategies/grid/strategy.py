"""Grid search over lists of values.

Task arithmetic chooses its scaling λ on held-out validation data from a grid (arXiv:2212.04089);
MergeBench recommends tuning merging coefficients on validation data (arXiv:2505.10833). The points are the
Cartesian product of the dimensions' values in declared order, the last dimension varying fastest (the order
of ``itertools.product``). With ``shuffle`` the same points come in an order drawn from ``search.seed``, so a
``trials`` cap visits a seeded random subset of the grid.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

from mergeplug.errors import MergeplugError
from mergeplug.tuning import Dimension, SearchStrategy, Trial


class GridSearch(SearchStrategy):
    def __init__(self, space: Sequence[Dimension], seed: int, parameters: dict, trials: int | None = None):
        super().__init__(space, seed, parameters, trials)
        for dim in self.space:
            if dim.is_range:
                raise MergeplugError(f"{dim.name} is a range {{low, high}}; grid search needs a list of values "
                                     f"(ranges are sampled by strategy random)")
        self.points = math.prod(len(dim.values) for dim in self.space)
        self.order = None
        if self.parameters.get("shuffle"):
            self.order = list(range(self.points))
            random.Random(self.seed).shuffle(self.order)

    def size(self) -> int:
        return self.points if self.trials is None else min(self.points, self.trials)

    def point(self, index: int) -> dict:
        """The ``index``-th point of the product in declared order (mixed-radix digits, last one fastest)."""
        values = {}
        for dim in reversed(self.space):
            index, digit = divmod(index, len(dim.values))
            values[dim.name] = dim.values[digit]
        return {dim.name: values[dim.name] for dim in self.space}

    def propose(self, trials: Sequence[Trial]) -> dict | None:
        index = len(trials)
        if index >= self.points:
            return None
        return self.point(self.order[index] if self.order is not None else index)
