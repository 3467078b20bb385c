"""Uniform random tokens ("random"): the floor any informed selection must beat.

Seeded by `CATConfig.seed` at the start of each run, on the model's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ranking
from .base import TokenPolicy


def random_selection(
    groups: int, num_tokens: int, budget: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """`budget` tokens drawn uniformly without replacement for each group."""
    noise = torch.rand(groups, num_tokens, generator=generator, device=device)
    return ranking.take_smallest(noise, budget)


class RandomPolicy(TokenPolicy):
    name = "random"

    def first(self, output: Tensor) -> Tensor:
        self.generator = torch.Generator(device=output.device).manual_seed(self.config.seed)
        return self.next(output, None)

    def next(self, output: Tensor, computed: Tensor | None) -> Tensor:
        groups, tokens = output.shape[:2]
        return random_selection(groups, tokens, self.budget, self.generator, output.device)

    def free(self) -> None:
        super().free()
        self.generator: torch.Generator | None = None
