"""Drift only ("noise"): the tokens whose output moved furthest from the reference.

The ablation that removes clusters and staleness from CAT: it can starve quiet regions.
"""

from __future__ import annotations

from torch import Tensor

from . import ranking
from .base import DriftPolicy


def noise_selection(delta: Tensor, budget: int) -> Tensor:
    """Drift only: the `budget` tokens whose output moved furthest from the reference."""
    return ranking.take_smallest(ranking.ranks(delta, descending=True), budget)


class NoisePolicy(DriftPolicy):
    name = "noise"

    def first(self, output: Tensor) -> Tensor:
        return self.next(output, None)

    def next(self, output: Tensor, computed: Tensor | None) -> Tensor:
        return noise_selection(self.drift(output)[1], self.budget)
