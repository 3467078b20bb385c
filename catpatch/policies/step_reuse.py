"""Step-level reuse ("step"): after the warm-up, run the whole model on evenly spaced steps only.

The DeepCache-style peer of token pruning at the same cost: as many post-warm-up steps run the
model as CAT's pruned steps would pay for in MACs; every other step gives the last output again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import StepPolicy


class StepReuse(StepPolicy):
    name = "reuse"
    skips = True

    def __init__(self, config):
        super().__init__(config)
        self.compute_steps: set[int] = set()
        self.free()

    def plan(self, planned_steps: int | None, step_cost_ratio: float) -> None:
        """Run the model on as many post-warm-up steps as `step_cost_ratio` (pruned / full
        step MACs) of them would cost, evenly spaced."""
        if planned_steps is None:
            raise ValueError(
                'selection="step" plans whole steps and needs the number of steps: pipelines '
                "give it; in your own loop pass num_inference_steps to cat_generation"
            )
        t0 = self.config.warmup_steps
        after = max(0, planned_steps - t0)
        count = min(after, round(after * step_cost_ratio))
        spaced = torch.linspace(0, after - 1, count).round().long().tolist() if count else []
        self.compute_steps = {t0 + i for i in spaced}

    def runs_model(self, step: int) -> bool:
        return step < self.config.warmup_steps or step in self.compute_steps

    def observe(self, sample: Tensor) -> None:
        self.last_sample = sample

    def output(self) -> Tensor:
        return self.last_sample

    def free(self) -> None:
        self.last_sample: Tensor | None = None
