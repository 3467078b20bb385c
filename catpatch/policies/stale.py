"""Staleness only ("stale"): round robin over the least recently computed tokens.

The ablation that removes drift and clusters from CAT: it spreads computation evenly in time.
"""

from __future__ import annotations

from torch import Tensor

from . import ranking
from .base import RecencyPolicy


def stale_selection(recency: Tensor, budget: int) -> Tensor:
    """Round robin: the `budget` least recently computed tokens (ties: lower index first)."""
    return ranking.take_smallest(ranking.ranks(recency, descending=False), budget)


class StalePolicy(RecencyPolicy):
    name = "stale"

    def first(self, output: Tensor) -> Tensor:
        self.reset_recency(output)
        return stale_selection(self.recency, self.budget)

    def next(self, output: Tensor, computed: Tensor) -> Tensor:
        self.update_recency(computed)
        return stale_selection(self.recency, self.budget)
