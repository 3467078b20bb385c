"""The budget knob `CATConfig(macs=B)` on real (tiny and toy) pipelines: the MACs stay within
the budget, the planned steps are the ones that ran, and three-way comparisons (unpatched,
budgeted, budgeted at macs=1, which must equal unpatched exactly)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import generate, make_pipe

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats, is_patched, remove_cat
from catpatch.calibration import Calibration, calibrate
from catpatch.planner import plan_run
from catpatch.policies.planned import default_sigmas

GUIDANCE = 7.0  # the SD3 pipeline's default guidance scale, which `generate` keeps


@pytest.fixture(scope="module")
def tiny_calibration():
    """The tiny SD3 pipeline's own calibration (20 steps, two captions)."""
    return calibrate(
        make_pipe(), ["a red circle", "a blue square"], num_inference_steps=20,
        height=128, width=128,
    )  # fmt: skip


def scheduler_sigmas(pipe, total: int) -> np.ndarray:
    """The σ of the pipeline's last loop of `total` steps and its end (float32 → float64)."""
    return pipe.scheduler.sigmas[-(total + 1) :].float().numpy().astype(np.float64)


def check_run(pipe, budget: float, steps: int) -> None:
    """MACs within the budget, and the plan's computed steps are the ones that ran the model."""
    stats = cat_stats(pipe)
    assert stats.steps == steps
    assert stats.macs_ratio <= budget + 0.01, (stats.macs_ratio, budget)
    assert stats.macs_ratio > 0
    plan = stats.plan
    assert plan is not None and plan.steps == steps and plan.budget == budget
    modes = [mode for mode, _, _ in stats.per_step]
    assert modes == ["full" if s in plan.computed else "reuse" for s in range(steps)], modes
    assert stats.reused_steps == steps - len(plan.computed)
    assert stats.macs_ratio == pytest.approx(len(plan.computed) / steps)
    summary = stats.summary()
    assert f"budget {budget:g}" in summary and "at most" in summary, summary
    assert plan.describe() in summary, summary


# ---- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        (dict(macs=0), r"must be in \(0, 1\]"),
        (dict(macs=-0.1), r"must be in \(0, 1\]"),
        (dict(macs=1.5), r"must be in \(0, 1\]"),
        (dict(macs=float("nan")), r"must be in \(0, 1\]"),
        (dict(macs=float("inf")), r"must be in \(0, 1\]"),
        (dict(macs=True), "must be a number"),
        (dict(macs="0.4"), "must be a number"),
        (dict(macs=0.4, keep_ratio=0.2), "give either macs= .* or the manual knobs"),
        (dict(macs=0.4, selection="cat"), "give either macs= .* or the manual knobs"),
        (dict(macs=0.4, warmup_steps=4), "warmup_steps="),
        (dict(macs=0.4, reuse_order=0), "reuse_order="),
        (dict(forecast="x"), "must be one of"),
        (dict(macs=0.4, forecast="x"), "must be one of"),
        (dict(macs=0.4, calibration=3), "must be a path, a catpatch.Calibration or None"),
    ],
)
def test_bad_budgets_name_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        CATConfig(**kwargs)


def test_good_budgets_are_accepted():
    for macs in (1, 1.0, 0.4, 1e-3):
        config = CATConfig(macs=macs)
        assert config.budgeted and "macs=" in repr(config)
    from catpatch.config import DEFAULT_MACS

    assert CATConfig().budgeted == (DEFAULT_MACS is not None)
    assert not CATConfig(keep_ratio=0.3).budgeted  # a manual knob named: no default budget


# ---- tiny SD3 pipelines ----------------------------------------------------------------------
@pytest.mark.parametrize("budget", (0.25, 0.5))
def test_budget_holds_and_the_plan_is_what_ran(budget, tiny_calibration):
    pipe = make_pipe()
    reference, other = generate(pipe), generate(pipe, seed=1)
    apply_cat(pipe, CATConfig(macs=budget, calibration=tiny_calibration))
    budgeted = generate(pipe)
    check_run(pipe, budget, 10)
    sigmas = scheduler_sigmas(pipe, 10)
    expected = plan_run(tiny_calibration.gram(sigmas, GUIDANCE), sigmas, budget)
    assert cat_stats(pipe).plan == expected, "the plan is not the calibration's for this run"
    # three-way: budgeted moved the image, but it is still this seed's image
    assert np.isfinite(budgeted).all()
    change = np.abs(budgeted - reference).mean()
    assert 0 < change < np.abs(other - reference).mean() / 3, change
    with pytest.warns(UserWarning, match="saves nothing"):
        apply_cat(pipe, CATConfig(macs=1.0, calibration=tiny_calibration))
        full = generate(pipe)
    assert np.array_equal(full, reference), "macs=1.0 must equal the unpatched run exactly"
    assert cat_stats(pipe).macs_ratio == 1.0
    remove_cat(pipe)
    assert np.array_equal(generate(pipe), reference)


def test_a_second_generation_gives_the_same_image(tiny_calibration):
    pipe = make_pipe()
    apply_cat(pipe, CATConfig(macs=0.4, calibration=tiny_calibration))
    first = generate(pipe)
    assert np.array_equal(generate(pipe), first)
    assert np.array_equal(generate(pipe, num_inference_steps=20)[0].shape, first[0].shape)
    check_run(pipe, 0.4, 20)
    assert np.array_equal(generate(pipe), first)
    check_run(pipe, 0.4, 10)


@pytest.mark.parametrize("budget", (0.25, 0.5))
def test_img2img_plans_the_shortened_run(budget, tiny_calibration):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline(**make_pipe().components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    kwargs = dict(image=image, strength=0.5, num_inference_steps=20)
    reference = generate(pipe, **kwargs)
    apply_cat(pipe, CATConfig(macs=budget, calibration=tiny_calibration))
    budgeted = generate(pipe, **kwargs)
    check_run(pipe, budget, 10)
    sigmas = scheduler_sigmas(pipe, 10)
    assert sigmas[0] < 0.9, "the plan must be made for the shortened run's σ"
    assert cat_stats(pipe).plan == plan_run(tiny_calibration.gram(sigmas, GUIDANCE), sigmas, budget)
    assert not np.array_equal(budgeted, reference)
    with pytest.warns(UserWarning, match="saves nothing"):
        apply_cat(pipe, CATConfig(macs=1.0, calibration=tiny_calibration))
        assert np.array_equal(generate(pipe, **kwargs), reference)


def test_without_a_calibration_it_warns_and_still_runs():
    pipe = make_pipe()
    with pytest.warns(UserWarning, match="calibrate"):
        apply_cat(pipe, CATConfig(macs=0.5))
    out = generate(pipe)
    assert np.isfinite(out).all()
    check_run(pipe, 0.5, 10)


def test_a_calibration_object_and_its_saved_file_give_the_same_run(tmp_path, tiny_calibration):
    pipe = make_pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a given calibration: no fallback warning
        apply_cat(pipe, CATConfig(macs=0.4, calibration=tiny_calibration))
        first, plan = generate(pipe), cat_stats(pipe).plan
        tiny_calibration.save(tmp_path)
        apply_cat(pipe, CATConfig(macs=0.4, calibration=str(tmp_path)))
        assert np.array_equal(generate(pipe), first)
    assert cat_stats(pipe).plan == plan
    check_run(pipe, 0.4, 10)


def test_calibrate_on_a_patched_pipeline_measures_the_model_and_keeps_the_patch(
    tiny_calibration,
):
    pipe = make_pipe()
    config = CATConfig(macs=0.5, calibration=tiny_calibration)
    apply_cat(pipe, config)
    cal = calibrate(pipe, ["a red circle"], num_inference_steps=6, height=128, width=128)
    assert is_patched(pipe) and cat_stats(pipe).config is config
    plain = calibrate(make_pipe(), ["a red circle"], num_inference_steps=6, height=128, width=128)
    np.testing.assert_allclose(cal.guided(GUIDANCE), plain.guided(GUIDANCE), rtol=1e-6)


def test_a_budget_below_two_steps_fails_at_the_run_and_leaves_the_pipeline_working(
    tiny_calibration,
):
    pipe = make_pipe()
    reference = generate(pipe)
    apply_cat(pipe, CATConfig(macs=0.1, calibration=tiny_calibration))  # fine at 20+ steps
    with pytest.raises(ValueError, match=r"macs >= 0\.2"):
        generate(pipe)  # 10 steps: one computed step
    generate(pipe, num_inference_steps=20)  # the patch still works where the budget fits
    check_run(pipe, 0.1, 20)
    remove_cat(pipe)
    assert not is_patched(pipe)
    assert np.array_equal(generate(pipe), reference)


def test_a_missing_calibration_file_leaves_the_pipeline_as_it_was(tiny_calibration):
    pipe = make_pipe()
    reference = generate(pipe)
    with pytest.raises(FileNotFoundError, match="calibrate"):
        apply_cat(pipe, CATConfig(macs=0.4, calibration="/nonexistent"))
    assert not is_patched(pipe)
    assert np.array_equal(generate(pipe), reference)
    # already patched: the old patch stays
    old = CATConfig(macs=0.5, calibration=tiny_calibration)
    apply_cat(pipe, old)
    budgeted = generate(pipe)
    with pytest.raises(FileNotFoundError):
        apply_cat(pipe, CATConfig(macs=0.4, calibration="/nonexistent"))
    assert is_patched(pipe) and cat_stats(pipe).config is old
    assert np.array_equal(generate(pipe), budgeted)


# ---- your own loop ---------------------------------------------------------------------------
def own_loop(transformer, steps: int | None, loop: int = 10, **generation) -> None:
    """A CFG pair per call (unconditional row first), as pipelines stack it."""
    config = transformer.config
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(2, 9, config.joint_attention_dim, generator=gen)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=gen)
    latents = torch.randn(1, config.in_channels, 16, 16, generator=gen)
    with torch.no_grad(), cat_generation(transformer, num_inference_steps=steps, **generation):
        for step in range(loop):
            out = transformer(
                hidden_states=latents.repeat(2, 1, 1, 1), encoder_hidden_states=text,
                pooled_projections=pooled, timestep=torch.full((2,), 1000.0 * (1 - step / loop)),
            ).sample  # fmt: skip
            u, c = out.chunk(2)
            latents = latents - 0.1 * (u + GUIDANCE * (c - u))


def test_own_loop_plans_like_the_pipeline_given_its_sigmas(tiny_calibration):
    pipe = make_pipe()
    apply_cat(pipe, CATConfig(macs=0.4, calibration=tiny_calibration))
    generate(pipe)
    pipeline_stats = cat_stats(pipe)
    sigmas = pipe.scheduler.sigmas
    own_loop(pipe.transformer, 10, sigmas=sigmas, cfg=True, guidance_scale=GUIDANCE)
    stats = cat_stats(pipe.transformer)
    assert stats.plan == pipeline_stats.plan
    assert [m for m, _, _ in stats.per_step] == [m for m, _, _ in pipeline_stats.per_step]
    assert stats.macs_ratio <= 0.41
    # without the σ, the planner assumes SD3's schedule (shift 3)
    own_loop(pipe.transformer, 10, cfg=True, guidance_scale=GUIDANCE)
    grid = default_sigmas(10)
    expected = plan_run(tiny_calibration.gram(grid, GUIDANCE), grid, 0.4)
    assert cat_stats(pipe.transformer).plan == expected


def test_own_loop_without_a_step_count_names_the_fix(tiny_calibration):
    transformer = make_pipe().transformer
    apply_cat(transformer, CATConfig(macs=0.4, calibration=tiny_calibration))
    with pytest.raises(ValueError, match="num_inference_steps"):
        own_loop(transformer, None)


# ---- the shipped toy: its calibration sits in its weights folder -----------------------------
@pytest.mark.parametrize("budget", (0.25, 0.5))
def test_toy_finds_its_calibration_and_stays_within_the_budget(budget):
    from catpatch.toy import CALL_KWARGS, load_pipeline, weights_dir

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large red circle at the top left on a striped blue background"

    def run():
        gen = torch.Generator().manual_seed(0)
        return pipe(prompt, **CALL_KWARGS, generator=gen, output_type="np").images

    reference = run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found beside the model: no fallback warning
        apply_cat(pipe, CATConfig(macs=budget))
    budgeted = run()
    steps, guidance = CALL_KWARGS["num_inference_steps"], CALL_KWARGS["guidance_scale"]
    check_run(pipe, budget, steps)
    sigmas = scheduler_sigmas(pipe, steps)
    own = Calibration.load(weights_dir())
    assert cat_stats(pipe).plan == plan_run(own.gram(sigmas, guidance), sigmas, budget)
    change = np.abs(budgeted - reference).mean()
    assert 0 < change < 0.1, change
    with pytest.warns(UserWarning, match="saves nothing"):
        apply_cat(pipe, CATConfig(macs=1.0))
        assert np.array_equal(run(), reference)


# ---- FLUX: true CFG as two calls per step ----------------------------------------------------
def test_flux_true_cfg_counts_both_calls_within_the_budget(tiny_calibration):
    from flux_support import TRUE_CFG, flux_pipe, run

    pipe = flux_pipe()
    reference = run(pipe, **TRUE_CFG)
    apply_cat(pipe, CATConfig(macs=0.5, calibration=tiny_calibration))
    budgeted = run(pipe, **TRUE_CFG)
    stats = cat_stats(pipe)
    assert stats.calls_per_step == 2
    check_run(pipe, 0.5, 10)
    assert not np.array_equal(budgeted, reference) and np.isfinite(budgeted).all()
    with pytest.warns(UserWarning, match="saves nothing"):
        apply_cat(pipe, CATConfig(macs=1.0, calibration=tiny_calibration))
        assert np.array_equal(run(pipe, **TRUE_CFG), reference)


def test_a_default_budget_applies_only_when_no_knob_is_named(monkeypatch):
    """The machinery the defaults rule would switch on (`config.DEFAULT_MACS`): `CATConfig()`
    becomes the budget, any manual knob named (even at its default value) keeps the manual
    policy, and `replace` keeps whichever the config already is."""
    from catpatch import config

    monkeypatch.setattr(config, "DEFAULT_MACS", 0.5)
    assert CATConfig().macs == 0.5 and repr(CATConfig()) == "CATConfig(macs=0.5)"
    assert CATConfig(compile="default").macs == 0.5
    for knob in ({"keep_ratio": 0.3}, {"warmup_steps": 8}, {"selection": "step"}):
        assert not CATConfig(**knob).budgeted, knob
    assert CATConfig(macs=None).macs is None
    assert CATConfig().replace(seed=3).macs == 0.5
    assert not CATConfig(keep_ratio=0.2).replace(seed=1).budgeted
    monkeypatch.setattr(config, "DEFAULT_MACS", None)
    assert not CATConfig().budgeted
