"""Whole steps not computed: step-level reuse ("step"), alone or combined with CAT ("cat+reuse").

"step" is the DeepCache-style peer of token pruning at the same cost: after the warm-up, as
many steps run the whole model as CAT's pruned steps would pay for in MACs, evenly spaced, and
every other step gives the last output again.

"cat+reuse" composes the two, as the paper says CAT can: after the warm-up, the steps that run
the model are pruned steps, and evenly spaced ones in between are skipped, as many as bring
the run's MACs to `CATConfig.reuse_macs` of the unpatched run. A skipped step gives the last
output again, or with `CATConfig.reuse_order=1` a first-order forecast from the last two
computed outputs (per token, linear in the step index).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import StepPolicy


def _spaced(count: int, after: int, start: int) -> set[int]:
    """`count` of the steps start .. start+after-1, evenly spaced (first and last included)."""
    spaced = torch.linspace(0, after - 1, count).round().long().tolist() if count else []
    return {start + i for i in spaced}


class StepReuse(StepPolicy):
    """ "step": run the model on as many post-warm-up steps as CAT's pruned steps would cost."""

    name = "reuse"
    skips = True

    def __init__(self, config):
        super().__init__(config)
        self.compute_steps: set[int] = set()
        self.free()

    def plan(self, planned_steps: int | None, step_cost_ratio: float, **run) -> None:
        """Run the model on as many post-warm-up steps as `step_cost_ratio` (pruned / full
        step MACs) of them would cost, evenly spaced."""
        after = self._after_warmup(planned_steps)
        count = min(after, round(after * step_cost_ratio))
        self.compute_steps = _spaced(count, after, self.config.warmup_steps)

    def _after_warmup(self, planned_steps: int | None) -> int:
        if planned_steps is None:
            raise ValueError(
                f"selection={self.config.selection!r} plans whole steps and needs the number of "
                "steps: pipelines give it; in your own loop pass num_inference_steps to "
                "cat_generation"
            )
        return max(0, planned_steps - self.config.warmup_steps)

    def runs_model(self, step: int) -> bool:
        return step < self.config.warmup_steps or step in self.compute_steps

    def observe(self, sample: Tensor, step: int, call: int = 0) -> None:
        # Each call of a step keeps its own history: under true CFG (two calls per step) the
        # conditional and unconditional outputs are forecast separately.
        last, _ = self.history.get(call, (None, None))
        self.history[call] = ((step, sample), last)

    def output(self, step: int, call: int = 0) -> Tensor:
        (s1, v1), earlier = self.history[call]
        if self.config.reuse_order == 0 or earlier is None:
            return v1
        s2, v2 = earlier
        return torch.lerp(v2, v1, (step - s2) / (s1 - s2))  # v1 + (v1 - v2)·(step - s1)/(s1 - s2)

    def free(self) -> None:
        # call -> ((step, output) last computed, the one before it or None)
        self.history: dict[int, tuple[tuple[int, Tensor], tuple[int, Tensor] | None]] = {}


class PrunedStepReuse(StepReuse):
    """ "cat+reuse": pruned steps, with evenly spaced skipped steps down to a MACs target."""

    def plan(self, planned_steps: int | None, step_cost_ratio: float, **run) -> None:
        """The most pruned steps that keep the run within `reuse_macs` of its unpatched MACs
        (at least one); the rest of the post-warm-up steps are skipped."""
        after = self._after_warmup(planned_steps)
        t0, target = self.config.warmup_steps, self.config.reuse_macs
        affordable = math.floor((target * (t0 + after) - t0) / step_cost_ratio + 1e-9)
        self.compute_steps = _spaced(min(after, max(1, affordable)), after, t0)
