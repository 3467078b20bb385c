"""The planner: from a MACs budget to a run's plan (which steps run the model, and how every
other step is forecast), by measurement.

A flow-matching sampler moves the latent by x_{i+1} = x_i + dt_i·v_i (v_i the guided model
output at step i, dt_i = σ_{i+1} - σ_i). A step the model does not run gives a forecast
f_j = Σ_m w_jm·v_{h_m} of the last computed outputs h instead, so the final latent moves by
Σ_j dt_j·(f_j - v_j) (to first order: the later inputs' drift is left out). Every term is a
linear combination of the outputs, so its expected squared size is a quadratic form in the
Gram matrix G[a, b] = Σ <v_a, v_b> of the model's outputs over a few calibration captions
(`calibration.Calibration`, measured once per model on a fine σ grid and interpolated to the
run's σ). The planner searches the computed steps (the first `MIN_WARMUP`, then any placement,
not evenly spaced) and, for every other step, its forecast: by default ("auto") the
polynomial in σ of order 0, 1 or 2 through the last computed outputs whose error on the
calibration is smallest at that step, so it extrapolates over short gaps and falls back to
reuse over long ones where extrapolation diverges; "fit" instead fits free weights (summing to
1, shrunk toward reuse). Either is also searched with plain reuse, and the better plan kept:
never worse than reuse on the calibration captions.

Pure Python and NumPy on the host, once per (budget, σ schedule, guidance) before a run's
first step; the step loop only reads the plan's fixed weights (no host syncs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

HISTORY = 3  # computed outputs a forecast may combine
# Forecast families: "auto" (below), "fit" (weights fitted on the calibration), or a fixed
# Taylor order in σ over the last computed outputs ("reuse" = order 0).
FORECASTS = ("auto", "fit", "reuse", "taylor1", "taylor2")
# "auto": each skipped step takes the order (0, 1 or 2, a polynomial in σ through the last
# computed outputs) whose error on the calibration is the smallest at that step: a rule for
# gaps measured per model, never worse than reuse there, with no weights fitted to it.
AUTO_ORDERS = ("reuse", "taylor1", "taylor2")
# ... and a higher order must beat the lower one's error by AUTO_MARGIN to be chosen: the
# calibration, a fine run interpolated in σ, underestimates the extrapolation error of a coarser
# run's outputs over short gaps (orders 1 and 2 by 8-24% against exact calibrations at 28 and 50
# steps, both shipped models; a 200-step grid does not remove it: the coarse run's own
# trajectory is less smooth). Measured (scenes, 50 steps, MACs 0.6): 61.9 dB (worst image 51.9)
# at 0, 64.1 (56.4) at 0.15, 59.7 (50.7) at 0.5; the toy at 28 steps prefers less (0.15 costs
# it 2.5 dB at MACs 0.5, still 3.4 dB above every tuned peer).
AUTO_MARGIN = 0.15
RIDGE = 1e-3  # shrinkage of fitted weights toward reuse, relative to the history's scale
# A skipped step's error counts 1 + EARLY·σ times in the search: the linear model above leaves
# out that an early error moves the layout, which later steps build on. Measured on the toy
# (28 steps, 16 captions, budgets 0.25-0.5): 0 gives 3-6 dB less than 3-10; above 10 the plans
# no longer change.
EARLY = 10.0
MIN_COMPUTED = 2  # the first step, and at least one more to learn the trajectory from
# The first steps always computed (when the budget pays for more than these): a skipped step
# at the very top of the schedule can move an image's layout, which the mean error the
# search minimises underweights.
# 4: the toy at 28 steps and MACs 0.25 had a worst image of 19.6 dB with 3 (skipping steps 4-5
# moved one image's layout), 23.8 with 4, at 0.3 dB of the mean; TaylorSeer and ClusCa keep 3.
MIN_WARMUP = 4


@dataclass(frozen=True)
class Plan:
    """A run's plan: `computed` steps run the model; each other step j gives
    Σ_m weights[j][m]·output(history[j][m])."""

    steps: int
    computed: tuple[int, ...]
    history: dict[int, tuple[int, ...]] = field(default_factory=dict)
    weights: dict[int, tuple[float, ...]] = field(default_factory=dict)
    forecast: str = "auto"
    predicted_error: float = 0.0  # relative error of the final latent on the calibration
    budget: float = 1.0
    step_cost: float = 0.0  # MACs of a forecast step over a full one (anchors; else 0)

    @property
    def macs(self) -> float:
        """The plan's MACs over the unpatched run's."""
        computed = len(self.computed)
        return (computed + (self.steps - computed) * self.step_cost) / self.steps

    def describe(self) -> str:
        """The computed steps, counted from 1, as ranges ("1-4, 7, 12, 20")."""
        return _ranges([s + 1 for s in self.computed])


def computed_count(budget: float, steps: int, step_cost: float = 0.0) -> int:
    """Computed steps that fit in `budget` of `steps` (MACs at most the budget) when every
    other step costs `step_cost` of a full one."""
    if step_cost >= 1:
        return steps
    fit = (budget * steps - steps * step_cost) / (1 - step_cost)
    return max(0, min(steps, int(math.floor(fit + 1e-9))))


def min_budget(steps: int, step_cost: float = 0.0) -> float:
    """The smallest budget (to 3 decimals) that pays for `MIN_COMPUTED` of `steps` steps,
    rounded up: a suggestion rounded down would be refused again."""
    need = (MIN_COMPUTED + (steps - MIN_COMPUTED) * step_cost) / steps
    return math.ceil(need * 1000) / 1000


def check_budget(budget: float, steps: int, step_cost: float = 0.0) -> None:
    """Raise `ValueError` naming the fix when `budget` leaves too few computed steps."""
    count = computed_count(budget, steps, step_cost)
    if count < MIN_COMPUTED:
        need = min_budget(steps, step_cost)
        raise ValueError(
            f"CATConfig.macs={budget!r} at {steps} steps leaves {count} computed step(s); the "
            f"planner needs at least {MIN_COMPUTED} (the first step and one to forecast "
            f"from): use macs >= {need:.3f} or more steps"
        )


def plan_run(
    gram: np.ndarray, sigmas: np.ndarray, budget: float, forecast: str = "auto",
    step_cost: float = 0.0,
) -> Plan:  # fmt: skip
    """The plan of a run of N = len(sigmas) - 1 steps within `budget` of its MACs.

    `gram` (N, N): Gram matrix of the guided outputs at the run's steps (see
    `calibration.Calibration.gram`); `sigmas` (N + 1,): the σ of each step and the last one;
    `step_cost`: what a forecast step costs (its anchors), as a fraction of a full step."""
    if forecast not in FORECASTS:
        raise ValueError(f"forecast={forecast!r}: must be one of {FORECASTS}")
    steps = len(sigmas) - 1
    check_budget(budget, steps, step_cost)
    count = computed_count(budget, steps, step_cost)
    gram, sigmas = np.asarray(gram, np.float64), np.asarray(sigmas, np.float64)
    # Fitted weights are fitted step by step, but the search scores the sum of all steps'
    # errors, where they may add up: "fit" and "auto" also search with reuse and keep the better
    # plan, so it is never worse than reuse on the calibration.
    kinds = (forecast, "reuse") if forecast in ("fit", "auto") else (forecast,)
    searches = [_Search(gram, sigmas, kind) for kind in kinds]
    plans = []
    for search in searches:
        if count >= steps:
            best = tuple(range(steps))
        else:
            best = search.refine(min(search.starts(count), key=search.error))
        plans.append((search.error(best), best, search))
    _, best, search = min(plans, key=lambda p: p[0])
    history, weights = {}, {}
    for j in range(steps):
        if j not in best:
            history[j], weights[j] = search.forecast(j, best)
    error = search.relative_error(best)
    return Plan(steps, best, history, weights, search.kind, error, float(budget), step_cost)


class _Search:
    """The error of candidate plans on one Gram matrix, with the fitted forecasts cached."""

    def __init__(self, gram: np.ndarray, sigmas: np.ndarray, forecast: str):
        self.gram, self.sigmas, self.kind = gram, sigmas, forecast
        self.dt = np.diff(sigmas)
        self.steps = len(self.dt)
        self._weights: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
        total = self.dt @ gram @ self.dt
        self.scale = total if total > 0 else 1.0

    # -- forecasts
    def forecast(self, step: int, computed: tuple[int, ...]) -> tuple[tuple[int, ...], tuple]:
        """(history, weights) of skipped `step` under `computed` (history newest first)."""
        before = [c for c in computed if c < step]
        history = tuple(reversed(before[-HISTORY:]))
        return history, tuple(float(w) for w in self._fit(step, history))

    def _fit(self, step: int, history: tuple[int, ...]) -> np.ndarray:
        key = (step, history)
        if key not in self._weights:
            self._weights[key] = self._solve(step, history)
        return self._weights[key]

    def _solve(self, step: int, history: tuple[int, ...]) -> np.ndarray:
        m = len(history)
        reuse = np.zeros(m)
        reuse[0] = 1.0
        if m == 1 or self.kind == "reuse":
            return reuse
        if self.kind == "auto":
            best, best_error = reuse, self._step_error(step, history, reuse)
            for kind in AUTO_ORDERS[1:]:  # a higher order must beat the lower by AUTO_MARGIN
                weights = self._taylor(step, history, kind)
                error = self._step_error(step, history, weights)
                if error < best_error * (1 - AUTO_MARGIN):
                    best, best_error = weights, error
            return best
        if self.kind.startswith("taylor"):
            return self._taylor(step, history, self.kind)
        h = list(history)
        a = self.gram[np.ix_(h, h)]
        b = self.gram[h, step]
        ridge = RIDGE * max(np.trace(a) / m, 1e-30)
        # min w'Aw - 2b'w + ridge·|w - reuse|²  subject to Σw = 1 (KKT system)
        kkt = np.zeros((m + 1, m + 1))
        kkt[:m, :m] = a + ridge * np.eye(m)
        kkt[:m, m] = kkt[m, :m] = 1.0
        rhs = np.concatenate([b + ridge * reuse, [1.0]])
        try:
            return np.linalg.solve(kkt, rhs)[:m]
        except np.linalg.LinAlgError:
            return reuse

    def _taylor(self, step: int, history: tuple[int, ...], kind: str) -> np.ndarray:
        """Weights of the polynomial in σ of order `kind` through the newest outputs."""
        if kind == "reuse":
            return np.eye(len(history))[0]
        order = min(int(kind[-1]), len(history) - 1)
        nodes = self.sigmas[list(history[: order + 1])]
        return _lagrange(nodes, self.sigmas[step], len(history))

    def _step_error(self, step: int, history: tuple[int, ...], weights: np.ndarray) -> float:
        """Squared error of one step's forecast on the calibration."""
        coef = np.zeros(self.steps)
        coef[list(history)] += weights
        coef[step] -= 1.0
        return float(coef @ self.gram @ coef)

    # -- the error of a plan
    def coefficients(self, computed: tuple[int, ...], early: float = EARLY) -> np.ndarray:
        """The final latent's error as a combination of the outputs (one weight per step),
        each skipped step's part weighted 1 + early·σ."""
        coef = np.zeros(self.steps)
        chosen = set(computed)
        for j in range(self.steps):
            if j in chosen:
                continue
            scale = self.dt[j] * (1 + early * self.sigmas[j])
            coef[j] -= scale
            history, weights = self.forecast(j, computed)
            for h, w in zip(history, weights, strict=True):
                coef[h] += scale * w
        return coef

    def error(self, computed: tuple[int, ...]) -> float:
        coef = self.coefficients(computed)
        return float(coef @ self.gram @ coef)

    def relative_error(self, computed: tuple[int, ...]) -> float:
        """The final latent's predicted error over its whole move, unweighted."""
        coef = self.coefficients(computed, early=0.0)
        return math.sqrt(max(float(coef @ self.gram @ coef), 0.0) / self.scale)

    # -- the search
    def starts(self, count: int) -> list[tuple[int, ...]]:
        """Candidate plans: a warm-up of w consecutive steps, then the rest spread over the
        remaining steps densest early (exponent p < 1), evenly (1) or densest late (p > 1)."""
        candidates = set()
        n = self.steps
        for warmup in range(max(1, self.min_warmup(count)), count + 1):
            rest = count - warmup
            for power in (0.5, 0.7, 1.0, 1.4, 2.0):
                picks = set(range(warmup))
                for k in range(rest):
                    frac = ((k + 1) / (rest + 1)) ** power if rest else 0.0
                    picks.add(min(n - 1, warmup + round(frac * (n - warmup))))
                free = (s for s in range(warmup, n) if s not in picks)
                while len(picks) < count:
                    picks.add(next(free))
                candidates.add(tuple(sorted(picks)))
        return sorted(candidates)

    @staticmethod
    def min_warmup(count: int) -> int:
        """Leading steps every plan of `count` computed steps keeps: `MIN_WARMUP` when the
        budget pays for more, all but one of them when it pays for exactly those (one step left
        to place), else only the first (2-3 computed steps: spread, as the search finds)."""
        # Without the middle case a budget of exactly MIN_WARMUP steps fell back to a free
        # search, which spread them evenly (predicted best, measured worst). Toy, 16 captions:
        # 8 steps at 0.5 gave 27.4 dB free (1, 3, 5, 7) against 32.5 (1-3, 6); 12 steps at 0.4
        # 25.3 against 27.8. With 2-3 steps, leading ones cost more: 12 steps at 0.3 gave 23.4
        # (1, 5, 9) against 21.3 (1-2, 8).
        if count > MIN_WARMUP:
            return MIN_WARMUP
        return MIN_WARMUP - 1 if count == MIN_WARMUP else 1

    def refine(self, plan: tuple[int, ...]) -> tuple[int, ...]:
        """Local search: move one computed step (never the first) to another free step
        nearby while that lowers the error."""
        best, best_error = plan, self.error(plan)
        improved = True
        while improved:
            improved = False
            for i in range(max(1, self.min_warmup(len(best))), len(best)):
                for move in (-3, -2, -1, 1, 2, 3):
                    target = best[i] + move
                    if not 0 < target < self.steps or target in best:
                        continue
                    trial = tuple(sorted((*best[:i], target, *best[i + 1 :])))
                    trial_error = self.error(trial)
                    if trial_error < best_error * (1 - 1e-9):
                        best, best_error, improved = trial, trial_error, True
                        break
                if improved:
                    break
        return best


def _lagrange(nodes: np.ndarray, at: float, size: int) -> np.ndarray:
    """Weights of the polynomial through `nodes` evaluated at `at` (a Taylor forecast in σ of
    that order), padded with zeros to `size`."""
    weights = np.ones(len(nodes))
    for i, xi in enumerate(nodes):
        for k, xk in enumerate(nodes):
            if k != i:
                weights[i] *= (at - xk) / (xi - xk) if xi != xk else 0.0
    return np.concatenate([weights, np.zeros(size - len(nodes))])


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)
