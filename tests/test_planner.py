"""The planner (`catpatch.planner`), pure NumPy: from a MACs budget and a Gram matrix of the
model's outputs to a run's plan. Gram matrices here come from hand-made output trajectories
(vectors v_i at the run's σ), so what a forecast can do on them is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from catpatch import planner
from catpatch.calibration import Calibration
from catpatch.planner import FORECASTS, HISTORY, _Search, check_budget, computed_count, plan_run
from catpatch.policies.planned import default_sigmas

BUDGETS = (0.05, 0.1, 0.2, 0.25, 0.29, 0.3, 1 / 3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.75, 0.9, 1.0)
STEP_COUNTS = (3, 4, 7, 10, 12, 20, 28, 30, 50, 100)


def trajectory(steps: int, curvature: float = 0.0, seed: int = 0, shift: float = 3.0):
    """(gram, sigmas) of outputs v_i = a + b·σ_i + curvature·c·σ_i² (random a, b, c)."""
    sigmas = default_sigmas(steps, shift)
    a, b, c = np.random.default_rng(seed).normal(size=(3, 48))
    s = sigmas[:-1, None]
    outputs = a + b * s + curvature * c * s**2
    return outputs @ outputs.T, sigmas


def random_walk(steps: int, seed: int = 0):
    """(gram, sigmas) of outputs that wander with no smooth trend (a random walk)."""
    outputs = np.cumsum(np.random.default_rng(seed).normal(size=(steps, 32)), axis=0)
    return outputs @ outputs.T, default_sigmas(steps)


def step_error(gram: np.ndarray, step: int, history, weights) -> float:
    """|Σ w·v_h - v_step|² from the Gram matrix."""
    coef = np.zeros(len(gram))
    coef[step] -= 1.0
    for h, w in zip(history, weights, strict=True):
        coef[h] += w
    return float(coef @ gram @ coef)


# ---- the budget ------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_computed_count_never_exceeds_the_budget(steps):
    for budget in BUDGETS:
        count = computed_count(budget, steps)
        assert 0 <= count <= steps
        assert count / steps <= budget + 1e-9, (budget, steps, count)
        assert count / steps >= budget - 1 / steps, (budget, steps, count)


def test_computed_count_of_exact_fractions_is_not_rounded_down():
    """B·N an integer in exact arithmetic but not in floating point still counts it."""
    assert computed_count(0.3, 10) == 3
    assert computed_count(0.29, 100) == 29
    assert computed_count(0.7, 10) == 7
    assert computed_count(1.0, 28) == 28
    assert computed_count(0.1, 10) == 1


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_check_budget_accepts_exactly_the_budgets_with_two_computed_steps(steps):
    for budget in BUDGETS:
        if computed_count(budget, steps) >= planner.MIN_COMPUTED:
            check_budget(budget, steps)
            continue
        with pytest.raises(ValueError, match="macs >=") as err:
            check_budget(budget, steps)
        assert f"macs={budget!r} at {steps} steps" in str(err.value)


def suggested_budget(steps: int) -> float:
    with pytest.raises(ValueError, match="macs >=") as err:
        check_budget(0.01, steps)
    return float(str(err.value).split("macs >= ")[1].split()[0])


@pytest.mark.parametrize("steps", (4, 10, 12, 20, 50))
def test_the_suggested_budget_is_accepted(steps):
    need = suggested_budget(steps)
    check_budget(need, steps)  # the fix the message names works


@pytest.mark.parametrize("steps", (9, 28))
def test_the_suggested_budget_rounds_up(steps):
    need = suggested_budget(steps)
    assert computed_count(need, steps) >= planner.MIN_COMPUTED, (
        f"the message suggests macs >= {need} at {steps} steps, which leaves "
        f"{computed_count(need, steps)} computed step(s): the suggestion must round up"
    )


def test_a_budget_of_one_computed_step_is_refused_by_plan_run():
    gram, sigmas = trajectory(10)
    with pytest.raises(ValueError, match=r"macs >= 0\.200"):
        plan_run(gram, sigmas, 0.1)


def test_unknown_forecast_is_refused():
    gram, sigmas = trajectory(10)
    with pytest.raises(ValueError, match="must be one of"):
        plan_run(gram, sigmas, 0.5, forecast="x")


# ---- the shape of a plan ---------------------------------------------------------------------
def check_plan(plan, steps: int, budget: float) -> None:
    computed = plan.computed
    assert plan.steps == steps
    assert computed[0] == 0, "the first step must run the model"
    assert list(computed) == sorted(set(computed)), computed
    assert all(0 <= s < steps for s in computed)
    assert len(computed) == computed_count(budget, steps)
    assert plan.macs <= budget + 1e-9
    assert plan.macs == len(computed) / steps
    assert plan.budget == budget
    skipped = [s for s in range(steps) if s not in computed]
    assert sorted(plan.history) == skipped and sorted(plan.weights) == skipped
    for j in skipped:
        history, weights = plan.history[j], plan.weights[j]
        before = [c for c in computed if c < j]
        assert list(history) == before[::-1][:HISTORY], (j, history, before)
        assert len(weights) == len(history)
        assert sum(weights) == pytest.approx(1.0, abs=1e-9), (j, weights)
    assert np.isfinite(plan.predicted_error) and plan.predicted_error >= 0


@pytest.mark.parametrize("forecast", FORECASTS)
@pytest.mark.parametrize("steps", (4, 10, 20, 28))
def test_plans_are_well_formed(steps, forecast):
    gram, sigmas = trajectory(steps, curvature=2.0, seed=steps)
    for budget in (0.25, 0.4, 0.5, 0.75, 1.0):
        if computed_count(budget, steps) < planner.MIN_COMPUTED:
            continue
        plan = plan_run(gram, sigmas, budget, forecast)
        check_plan(plan, steps, budget)
        assert plan.forecast == forecast


def test_full_budget_computes_every_step():
    gram, sigmas = trajectory(12)
    plan = plan_run(gram, sigmas, 1.0)
    assert plan.computed == tuple(range(12))
    assert plan.history == {} and plan.weights == {}
    assert plan.predicted_error == 0.0
    assert plan.describe() == "1-12"


def test_describe_counts_from_one_in_ranges():
    plan = planner.Plan(steps=20, computed=(0, 1, 2, 3, 6, 11, 19))
    assert plan.describe() == "1-4, 7, 12, 20"


def test_plan_run_is_deterministic():
    gram, sigmas = trajectory(28, curvature=3.0, seed=4)
    first = plan_run(gram, sigmas, 0.4)
    again = plan_run(gram.copy(), sigmas.copy(), 0.4)
    assert first == again


def test_reuse_and_taylor_weights_are_the_textbook_ones():
    """reuse gives (1, 0, ...); taylor1 is the line through the last two computed outputs in σ."""
    gram, sigmas = trajectory(10)
    computed = (0, 1, 5)
    history, weights = _Search(gram, sigmas, "reuse").forecast(7, computed)
    assert history == (5, 1, 0) and weights == (1.0, 0.0, 0.0)
    _, weights = _Search(gram, sigmas, "taylor1").forecast(7, computed)
    s5, s1, s7 = sigmas[5], sigmas[1], sigmas[7]
    expected = ((s7 - s1) / (s5 - s1), (s7 - s5) / (s1 - s5), 0.0)
    np.testing.assert_allclose(weights, expected, atol=1e-12)
    # one computed output before: every forecast is reuse
    for forecast in FORECASTS:
        assert _Search(gram, sigmas, forecast).forecast(3, (0, 5)) == ((0,), (1.0,))


# ---- forecasts on known trajectories ---------------------------------------------------------
COMPUTED = (0, 1, 4, 8)  # every skipped step but none has two computed outputs before it


def test_taylor1_forecasts_a_linear_trajectory_exactly():
    gram, sigmas = trajectory(12)
    search = _Search(gram, sigmas, "taylor1")
    assert search.error(COMPUTED) <= 1e-9 * search.scale
    assert search.relative_error(COMPUTED) < 1e-6
    for j in range(12):
        if j not in COMPUTED:
            history, weights = search.forecast(j, COMPUTED)
            assert step_error(gram, j, history, weights) <= 1e-9 * gram[j, j]


@pytest.mark.parametrize("seed", range(5))
def test_fit_is_never_worse_than_reuse_on_a_linear_trajectory(seed):
    gram, sigmas = trajectory(12, seed=seed)
    fit = _Search(gram, sigmas, "fit").error(COMPUTED)
    reuse = _Search(gram, sigmas, "reuse").error(COMPUTED)
    assert reuse > 0
    assert fit <= reuse
    # the fit is near the exact (linear) forecast: only the shrinkage toward reuse is left
    assert _Search(gram, sigmas, "fit").relative_error(COMPUTED) < 0.05


@pytest.mark.parametrize("seed", range(5))
def test_fit_beats_taylor1_and_reuse_on_a_curved_trajectory(seed):
    gram, sigmas = trajectory(12, curvature=3.0, seed=seed)
    errors = {f: _Search(gram, sigmas, f).error(COMPUTED) for f in ("fit", "taylor1", "reuse")}
    assert errors["taylor1"] > 1e-6 * errors["reuse"], "no curvature: the test checks nothing"
    assert errors["fit"] <= errors["taylor1"], errors
    assert errors["fit"] <= errors["reuse"], errors


@pytest.mark.parametrize("seed", range(6))
def test_each_fitted_forecast_is_never_worse_than_reuse_at_its_own_step(seed):
    """The per-step guarantee of the fit (its objective is that step's own error plus a
    shrinkage toward reuse): holds on any Gram matrix, smooth or not."""
    steps = 16
    gram, sigmas = random_walk(steps, seed) if seed % 2 else trajectory(steps, 3.0, seed)
    rng = np.random.default_rng(seed)
    computed = tuple(sorted({0, *rng.choice(np.arange(1, steps), 5, replace=False).tolist()}))
    fit, reuse = _Search(gram, sigmas, "fit"), _Search(gram, sigmas, "reuse")
    for j in range(steps):
        if j in computed:
            continue
        mine = step_error(gram, j, *fit.forecast(j, computed))
        plain = step_error(gram, j, *reuse.forecast(j, computed))
        assert mine <= plain * (1 + 1e-9) + 1e-12, (j, mine, plain)


def test_fit_plan_is_never_worse_than_reuse_on_the_shipped_toy_calibration():
    """`CATConfig.forecast` documents "fit" as never worse than reuse on the calibration. Fitted
    weights are fitted step by step while the search scores the sum of the steps' errors, so
    on the toy's own calibration (10 steps, guidance 5, macs=0.25) a fitted plan alone scores
    worse than plain reuse: the planner must then keep the reuse plan."""
    from catpatch.toy import weights_dir

    cal = Calibration.load(weights_dir())
    sigmas = default_sigmas(10)
    gram = cal.gram(sigmas, 5.0)
    plan = plan_run(gram, sigmas, 0.25, "fit")
    reuse_plan = plan_run(gram, sigmas, 0.25, "reuse")
    own = _Search(gram, sigmas, plan.forecast).error(plan.computed)
    reuse = _Search(gram, sigmas, "reuse").error(reuse_plan.computed)
    assert own <= reuse * (1 + 1e-12), (
        f"forecast='fit' gave {plan.forecast} weights on {plan.computed} scoring {own:.4g}; "
        f"plain reuse on {reuse_plan.computed} scores {reuse:.4g}"
    )
    for budget in (0.25, 0.3, 0.4, 0.5, 0.6):
        for steps in (8, 12, 20, 28, 50):
            if computed_count(budget, steps) < 2:
                continue
            s = default_sigmas(steps)
            g = cal.gram(s, 5.0)
            fit, plain = plan_run(g, s, budget, "fit"), plan_run(g, s, budget, "reuse")
            mine = _Search(g, s, fit.forecast).error(fit.computed)
            assert mine <= _Search(g, s, "reuse").error(plain.computed) * (1 + 1e-12)


def test_the_plan_search_finds_a_better_plan_than_even_spacing():
    """The search is no worse than any of its own starting candidates (it takes the best and
    refines it), e.g. the evenly spaced one."""
    gram, sigmas = trajectory(20, curvature=3.0, seed=1)
    plan = plan_run(gram, sigmas, 0.25)
    search = _Search(gram, sigmas, plan.forecast)  # the kind the plan kept
    count = computed_count(0.25, 20)
    best_start = min(search.error(c) for c in search.starts(count))
    # rounding: the errors of good plans are sums of nearly cancelling terms, near 0 either side
    assert search.error(plan.computed) <= best_start + 1e-12 * search.scale
    for start in search.starts(count):
        assert start[0] == 0 and len(set(start)) == count and list(start) == sorted(start)


def test_more_budget_predicts_less_error_on_a_smooth_trajectory():
    gram, sigmas = trajectory(28, curvature=3.0, seed=2)
    errors = [plan_run(gram, sigmas, b).predicted_error for b in (0.25, 0.5, 0.75, 1.0)]
    assert errors[-1] == 0.0
    assert all(a >= b for a, b in zip(errors, errors[1:], strict=False)), errors


# ---- the step policy (`PlannedSteps`) on a hand-made calibration -----------------------------
def planned_policy(steps: int = 12, macs: float = 0.5, guidance=None, sigmas=None):
    """`PlannedSteps` of `CATConfig(macs=macs)` planned for `steps` on a curved trajectory's
    Gram matrix (the calibration's grid is the run's own σ)."""
    import torch  # noqa: F401 (the policy's tensors)

    from catpatch import CATConfig
    from catpatch.policies import build

    gram, grid = trajectory(steps, curvature=3.0, seed=7)
    token, policy = build(CATConfig(macs=macs))
    assert token is None
    policy.calibration = Calibration(sigmas=grid[:-1], cond=gram)
    policy.plan(steps, 1.0, sigmas=grid if sigmas is None else sigmas, guidance=guidance)
    return policy, gram, grid


def test_policy_runs_the_model_on_the_plans_computed_steps():
    policy, gram, grid = planned_policy()
    assert policy.plan_of_run == plan_run(gram, grid, 0.5)
    assert [policy.runs_model(s) for s in range(12)] == [
        s in policy.plan_of_run.computed for s in range(12)
    ]


def test_policy_without_sigmas_plans_the_default_schedule():
    policy, gram, grid = planned_policy(sigmas=np.array([1.0, 0.0]))  # wrong length: ignored
    assert np.array_equal(grid, default_sigmas(12))
    assert policy.plan_of_run == plan_run(gram, grid, 0.5)


def test_policy_without_a_step_count_names_the_fix():
    from catpatch import CATConfig
    from catpatch.policies.planned import PlannedSteps

    with pytest.raises(ValueError, match="num_inference_steps"):
        PlannedSteps(CATConfig(macs=0.5)).plan(None, 1.0)


def outputs(steps: int, dtype, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 6, 5, generator=gen).to(dtype) for _ in range(steps)]


def weighted(plan, step: int, samples):
    """Σ w·output(h) of a skipped step, in float64."""
    pairs = zip(plan.history[step], plan.weights[step], strict=True)
    return sum(w * samples[h].double() for h, w in pairs)


def run_policy(policy, per_call: dict, steps: int) -> dict:
    """Drive the policy like a run: observe each computed step's output per call, ask the
    forecast of each skipped one. -> {(step, call): forecast}."""
    forecasts = {}
    for step in range(steps):
        for call, samples in per_call.items():
            if policy.runs_model(step):
                policy.observe(samples[step], step, call)
            else:
                forecasts[step, call] = policy.output(step, call)
    return forecasts


def test_policy_output_is_the_weighted_sum_of_each_calls_own_history():
    import torch

    policy, _, _ = planned_policy()
    plan = policy.plan_of_run
    per_call = {0: outputs(12, torch.float32, 0), 1: outputs(12, torch.float32, 1)}
    forecasts = run_policy(policy, per_call, 12)
    assert len(forecasts) == 2 * (12 - len(plan.computed))
    assert any(len(plan.history[j]) > 1 for j in plan.history), "only reuse: checks little"
    for (step, call), got in forecasts.items():
        mine = per_call[call]
        expected = weighted(plan, step, mine)
        assert got.dtype == torch.float32 and got.shape == mine[0].shape
        # float32 arithmetic against a float64 reference: float32 rounding
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        if plan.weights[step] == (1.0,):  # reuse gives the very output again
            assert torch.equal(got, mine[plan.history[step][0]])
    # each call keeps at most HISTORY outputs, newest first
    for call in (0, 1):
        kept = [s for s, _ in policy.history[call]]
        assert kept == sorted(plan.computed, reverse=True)[:HISTORY]


@pytest.mark.parametrize("dtype", ("bfloat16", "float16"))
def test_policy_output_keeps_the_input_dtype(dtype):
    import torch

    dtype = getattr(torch, dtype)
    policy, _, _ = planned_policy()
    samples = outputs(12, dtype)
    forecasts = run_policy(policy, {0: samples}, 12)
    assert forecasts
    for (step, _), got in forecasts.items():
        assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == (2, 6, 5)
        plan = policy.plan_of_run
        expected = weighted(plan, step, samples)
        torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=3e-2)


def test_policy_free_forgets_the_history_but_keeps_the_plan():
    import torch

    policy, _, _ = planned_policy()
    run_policy(policy, {0: outputs(12, torch.float32)}, 12)
    plan = policy.plan_of_run
    policy.free()
    assert policy.history == {}
    policy.plan(12, 1.0, sigmas=trajectory(12)[1])
    assert policy.plan_of_run is plan, "the same run shape must reuse its cached plan"


# ---- "auto": the order per gap, and the warm-up every plan keeps ------------------------------
def test_auto_takes_a_higher_order_only_when_it_beats_the_lower_by_the_margin(monkeypatch):
    from catpatch import planner

    sigmas = default_sigmas(12)
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 48))  # a line in σ plus a little wandering: order 1 wins
    outputs = a + b * sigmas[:-1, None] + 0.02 * np.cumsum(rng.normal(size=(12, 48)), axis=0)
    gram = outputs @ outputs.T
    search = _Search(gram, sigmas, "auto")
    step, history = 9, (7, 5, 3)
    errors = {
        kind: search._step_error(step, history, search._taylor(step, history, kind))
        for kind in planner.AUTO_ORDERS
    }
    winner = min(errors, key=errors.get)
    assert winner != "reuse", errors  # the case needs an order above reuse to be better
    gain = 1 - errors[winner] / errors["reuse"]
    for margin, expected in ((gain * 0.9, winner), (gain * 1.1, None)):
        monkeypatch.setattr(planner, "AUTO_MARGIN", margin)
        chosen = _Search(gram, sigmas, "auto")._solve(step, history)
        if expected is not None:
            assert np.allclose(chosen, search._taylor(step, history, expected))
        else:  # not better by the margin than reuse: reuse, or an order that is
            reuse_error = errors["reuse"]
            chosen_error = search._step_error(step, history, chosen)
            assert chosen_error == reuse_error or chosen_error < reuse_error * (1 - margin)


@pytest.mark.parametrize("steps, budget", [(20, 0.3), (28, 0.25), (50, 0.2), (50, 0.6)])
def test_every_plan_that_can_keeps_the_first_min_warmup_steps(steps, budget):
    from catpatch.planner import MIN_WARMUP

    gram, sigmas = trajectory(steps, curvature=3.0, seed=4)
    plan = plan_run(gram, sigmas, budget)
    assert len(plan.computed) > MIN_WARMUP
    assert plan.computed[:MIN_WARMUP] == tuple(range(MIN_WARMUP))


@pytest.mark.parametrize("steps, budget", [(8, 0.5), (12, 0.4), (20, 0.2)])
def test_a_budget_of_exactly_min_warmup_steps_keeps_all_but_one_leading(steps, budget):
    """A free search spreads such a plan (on the toy's calibration: 1, 3, 6, 9 at 12 steps;
    predicted best, measured 2.5-5 dB worse); the planner keeps MIN_WARMUP - 1 leading steps
    and places the last one."""
    from catpatch.planner import MIN_WARMUP
    from catpatch.toy import weights_dir

    sigmas = default_sigmas(steps)
    plan = plan_run(Calibration.load(weights_dir()).gram(sigmas, 5.0), sigmas, budget)
    assert len(plan.computed) == MIN_WARMUP
    assert plan.computed[: MIN_WARMUP - 1] == tuple(range(MIN_WARMUP - 1)), plan.describe()
