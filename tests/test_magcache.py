"""diffusers' MagCache on SD3 pipelines through `catpatch.peers.magcache` (a peer of the study)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import generate, make_pipe

from catpatch.peers.magcache import (
    MagCache,
    apply_magcache,
    calibrate_magcache,
    magcache_skipped_steps,
    remove_magcache,
)
from catpatch.stats import measured_macs

STEPS = 10
MODEL = "SD3Transformer2DModel"


@pytest.fixture(scope="module")
def calibrated():
    """A tiny SD3.5-medium pipeline (dual attention; last block `context_pre_only`), its
    unpatched images and its MagCache ratios at STEPS steps."""
    import torch

    pipe = make_pipe("tiny-sd3.5-medium")
    ratios = calibrate_magcache(
        pipe, ["a red circle", "a blue square"], STEPS, generator=torch.Generator().manual_seed(0)
    )
    return pipe, generate(pipe), ratios


def test_diffusers_magcache_as_shipped_leaks_state_between_sd3_generations(calibrated):
    """Why the module resets: diffusers' MagCache runs on SD3, but a generation of another
    step count leaves its counter mid-schedule, and the next generation skips steps of its
    warm-up with the residual of another image."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    pipe = make_pipe("tiny-sd3.5-medium")
    _, _, ratios = calibrated
    apply_mag_cache(
        pipe.transformer,
        MagCacheConfig(threshold=0.5, num_inference_steps=STEPS, mag_ratios=ratios),
    )
    fresh = generate(pipe)
    generate(pipe, num_inference_steps=STEPS + 2)
    assert np.abs(generate(pipe) - fresh).max() > 1e-3


def test_calibration_gives_one_finite_ratio_per_step_and_leaves_no_trace(calibrated):
    pipe, base, ratios = calibrated
    assert len(ratios) == STEPS
    assert ratios[0] == 1.0  # diffusers' neutral first value: no earlier residual
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    assert ratios != [1.0] * STEPS
    for module in (pipe.transformer, *pipe.transformer.transformer_blocks):
        assert "_diffusers_hook" not in vars(module) and "forward" not in vars(module)
    np.testing.assert_array_equal(generate(pipe), base)


def test_threshold_zero_skips_nothing_and_equals_unpatched(calibrated):
    pipe, base, ratios = calibrated
    apply_magcache(pipe, MagCache(threshold=0.0, num_inference_steps=STEPS, mag_ratios=ratios))
    try:
        images = generate(pipe)
        assert magcache_skipped_steps(pipe) == []
    finally:
        remove_magcache(pipe)
    np.testing.assert_array_equal(images, base)


def test_magcache_skips_steps_resets_and_is_removed(calibrated):
    pipe, base, ratios = calibrated
    settings = MagCache(
        threshold=0.5, max_skip_steps=2, num_inference_steps=STEPS, mag_ratios=ratios
    )
    apply_magcache(pipe, settings)
    with pytest.raises(ValueError, match="already applied"):
        apply_magcache(pipe, settings)
    first = generate(pipe)
    skipped = magcache_skipped_steps(pipe)
    second = generate(pipe)
    assert magcache_skipped_steps(pipe) == skipped
    macs = measured_macs(lambda: generate(pipe), MODEL)
    remove_magcache(pipe)
    unpatched = measured_macs(lambda: generate(pipe), MODEL)
    restored = generate(pipe)

    warmup = round(settings.retention_ratio * STEPS)
    assert skipped and min(skipped) >= warmup, skipped
    np.testing.assert_array_equal(first, second)  # each generation starts from fresh state
    assert np.abs(first - base).max() > 1e-4, "MagCache skipped nothing"
    assert np.abs(first - base).mean() < 0.05
    # a skipped step still runs the embeddings and output layers: a little over 1 - skipped/steps
    assert 1 - len(skipped) / STEPS < macs / unpatched < 1 - len(skipped) / STEPS + 0.05
    np.testing.assert_array_equal(restored, base)


def test_state_does_not_leak_from_a_failed_generation(calibrated):
    """diffusers resets MagCache's state only when a loop reaches its step count; a loop that
    stops early (here an exception in a step callback) must not shift the next generation."""
    pipe, _, ratios = calibrated
    apply_magcache(pipe, MagCache(threshold=0.5, num_inference_steps=STEPS, mag_ratios=ratios))
    try:
        expected = generate(pipe)

        def fail(pipe, step, timestep, kwargs):
            if step == 4:
                raise RuntimeError("stop")
            return kwargs

        with pytest.raises(RuntimeError, match="stop"):
            generate(pipe, callback_on_step_end=fail)
        np.testing.assert_array_equal(generate(pipe), expected)
    finally:
        remove_magcache(pipe)


def test_unsupported_calls_are_refused(calibrated):
    pipe, base, ratios = calibrated
    with pytest.raises(ValueError, match="calibrate_magcache"):
        apply_magcache(pipe, MagCache(num_inference_steps=STEPS))
    apply_magcache(pipe, MagCache(threshold=0.5, num_inference_steps=STEPS, mag_ratios=ratios))
    try:
        with pytest.raises(ValueError, match="set for 10 denoising steps but this loop has 12"):
            generate(pipe, num_inference_steps=12)
        with pytest.raises(ValueError, match="skip-layer guidance"):
            generate(pipe, skip_guidance_layers=[1])
    finally:
        remove_magcache(pipe)
    np.testing.assert_array_equal(generate(pipe), base)


def test_settings_are_validated():
    assert MagCache(mag_ratios=[1, 1.5]).mag_ratios == (1.0, 1.5)
    with pytest.raises(ValueError, match="threshold"):
        MagCache(threshold=-1)
    with pytest.raises(ValueError, match="retention_ratio"):
        MagCache(retention_ratio=2)
