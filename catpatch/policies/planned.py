"""Budgeted step reuse (`CATConfig(macs=B)`): the planner's steps run the model, every other
step gives its planned forecast, a fixed weighted sum of the last computed outputs.

The plan (`catpatch.planner`) is made on the host once per run, before its first step, from
the model's calibration and the run's σ schedule; plans are cached per (steps, σ, guidance),
so a second generation of the same shape plans nothing. The step loop keeps the last
`planner.HISTORY` computed outputs of each call and forms the forecast in a few elementwise
kernels with Python-float weights: static shapes, no host syncs.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from .. import planner
from .base import StepPolicy


def default_sigmas(steps: int, shift: float = 3.0) -> np.ndarray:
    """σ of a flow-matching Euler run of `steps` steps without a pipeline (SD3's shift 3):
    the σ schedule a user's own loop most likely has."""
    s = np.linspace(1.0, 1.0 / steps, steps)
    s = shift * s / (1 + (shift - 1) * s)
    return np.append(s, 0.0)


class PlannedSteps(StepPolicy):
    """`macs=B`: the planner's computed steps; forecasts on the others."""

    name = "planned"
    skips = True
    observes_pruned = False  # anchor steps are forecasts, not history

    def __init__(self, config):
        super().__init__(config)
        self.calibration = None  # set by the patch (`calibration.find`)
        self.plan_of_run: planner.Plan | None = None
        self._plans: dict[tuple, planner.Plan] = {}
        self.free()

    def plan(
        self,
        planned_steps: int | None,
        step_cost_ratio: float,
        sigmas: np.ndarray | None = None,
        guidance: float | None = None,
    ) -> None:
        if planned_steps is None:
            raise ValueError(
                "CATConfig(macs=...) plans whole steps and needs the number of steps: "
                "pipelines give it; in your own loop pass num_inference_steps to cat_generation"
            )
        if sigmas is None or len(sigmas) != planned_steps + 1:
            sigmas = default_sigmas(planned_steps)
        sigmas = np.asarray(sigmas, np.float64)
        key = (planned_steps, tuple(np.round(sigmas, 6)), guidance, step_cost_ratio)
        if key not in self._plans:
            gram = self.calibration.gram(sigmas, guidance)
            cost = step_cost_ratio if self.config.anchors else 0.0
            budget = self.config.macs
            short = planner.computed_count(budget, planned_steps, cost) < planner.MIN_COMPUTED
            if short and self.config.default_budget:  # a named budget fails instead
                budget = 1.0  # every step; the state warns that it saves nothing
            self._plans[key] = planner.plan_run(gram, sigmas, budget, self.config.forecast, cost)
        self.plan_of_run = self._plans[key]
        self.computed = frozenset(self.plan_of_run.computed)

    def runs_model(self, step: int) -> bool:
        return step in self.computed

    def observe(self, sample: Tensor, step: int, call: int = 0) -> None:
        # each call of a step keeps its own history (true CFG as two calls)
        kept = self.history.setdefault(call, [])
        kept.insert(0, (step, sample))
        del kept[planner.HISTORY :]

    def output(self, step: int, call: int = 0) -> Tensor:
        kept = dict(self.history[call])
        steps, weights = self.plan_of_run.history[step], self.plan_of_run.weights[step]
        first = kept[steps[0]]
        if len(steps) == 1 or all(w == 0 for w in weights[1:]):
            return first if weights[0] == 1 else (first.float() * weights[0]).to(first.dtype)
        total = first.float() * weights[0]
        for s, w in zip(steps[1:], weights[1:], strict=True):
            total = total.add_(kept[s].float(), alpha=w)
        return total.to(first.dtype)

    def free(self) -> None:
        self.history: dict[int, list[tuple[int, Tensor]]] = {}
        self.computed: frozenset[int] = frozenset()
