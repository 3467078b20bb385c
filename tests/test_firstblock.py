"""diffusers' FirstBlockCache on SD3 pipelines through `catpatch.peers.firstblock` (a peer)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import generate, instance_state, make_pipe

from catpatch.peers.firstblock import (
    FirstBlockCache,
    apply_firstblock,
    firstblock_skipped_steps,
    remove_firstblock,
)
from catpatch.stats import count_cpu_attention, measured_macs

STEPS = 10
MODEL = "SD3Transformer2DModel"


@pytest.fixture(scope="module")
def unpatched():
    """A tiny SD3.5-medium pipeline (dual attention; last block `context_pre_only`) and its
    unpatched images."""
    pipe = make_pipe("tiny-sd3.5-medium")
    return pipe, generate(pipe, num_inference_steps=STEPS)


def test_sd3_pipelines_cannot_run_first_block_cache_as_shipped():
    """Why the module exists: no cache context; with one, the last block's `None` text
    states reach FBC's tail hook."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    pipe = make_pipe()
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(ValueError, match="cache context"):
        generate(pipe, num_inference_steps=2)
    _set_cache_context(pipe.transformer, CacheContext("cond"))
    with pytest.raises(TypeError, match="NoneType"):
        generate(pipe, num_inference_steps=2)


def test_threshold_zero_skips_nothing_and_equals_unpatched(unpatched):
    pipe, base = unpatched
    apply_firstblock(pipe, FirstBlockCache(threshold=0.0))
    try:
        images = generate(pipe, num_inference_steps=STEPS)
        assert firstblock_skipped_steps(pipe) == []
    finally:
        remove_firstblock(pipe)
    np.testing.assert_allclose(images, base, rtol=0, atol=1e-6)


def test_firstblock_skips_steps_resets_and_is_removed(unpatched):
    pipe, base = unpatched
    before = instance_state(pipe)
    apply_firstblock(pipe, FirstBlockCache(threshold=10.0))
    with pytest.raises(ValueError, match="already applied"):
        apply_firstblock(pipe, FirstBlockCache(threshold=10.0))
    first = generate(pipe, num_inference_steps=STEPS)
    skipped = firstblock_skipped_steps(pipe)
    second = generate(pipe, num_inference_steps=STEPS)
    assert firstblock_skipped_steps(pipe) == skipped
    remove_firstblock(pipe)
    remove_firstblock(pipe)  # a second removal does nothing
    restored = generate(pipe, num_inference_steps=STEPS)

    assert skipped and 0 not in skipped, skipped  # the first step has no residual to compare
    assert all(0 < s < STEPS for s in skipped)
    np.testing.assert_array_equal(first, second)  # each generation starts from fresh state
    assert np.isfinite(first).all()
    assert np.abs(first - base).max() > 1e-4, "FirstBlockCache skipped nothing"
    np.testing.assert_array_equal(restored, base)
    assert instance_state(pipe) == before  # no hooks, registries or `forward`s left behind
    with pytest.raises(ValueError, match="not applied"):
        firstblock_skipped_steps(pipe)


def test_state_does_not_leak_from_a_failed_generation(unpatched):
    pipe, _ = unpatched
    apply_firstblock(pipe, FirstBlockCache(threshold=10.0))
    try:
        expected = generate(pipe, num_inference_steps=STEPS)

        def fail(pipe, step, timestep, kwargs):
            if step == 4:
                raise RuntimeError("stop")
            return kwargs

        with pytest.raises(RuntimeError, match="stop"):
            generate(pipe, num_inference_steps=STEPS, seed=1, callback_on_step_end=fail)
        np.testing.assert_array_equal(generate(pipe, num_inference_steps=STEPS), expected)
    finally:
        remove_firstblock(pipe)


def test_skipped_steps_cost_what_the_first_block_and_the_layers_around_it_cost(unpatched):
    """A skipped step runs the embeddings, the first block and the output layers: the FLOP
    counter's MACs of a run fall by the remaining blocks' share of each skipped step."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe, _ = unpatched
    count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        generate(pipe, num_inference_steps=STEPS)
    counts = {k: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items()}
    full = counts[MODEL]
    assert full == measured_macs(lambda: generate(pipe, num_inference_steps=STEPS), MODEL)
    depth = len(pipe.transformer.transformer_blocks)
    remaining = sum(counts[f"{MODEL}.transformer_blocks.{i}"] for i in range(1, depth)) // STEPS

    apply_firstblock(pipe, FirstBlockCache(threshold=10.0))
    try:
        macs = measured_macs(lambda: generate(pipe, num_inference_steps=STEPS), MODEL)
        skipped = len(firstblock_skipped_steps(pipe))
    finally:
        remove_firstblock(pipe)
    assert skipped > 0
    assert macs < full
    assert macs == pytest.approx(full - skipped * remaining, rel=1e-3)
    # per skipped step: the first block's share of a full step, and a little (embeddings, output)
    head = counts[f"{MODEL}.transformer_blocks.0"] / full
    skipped_step = (macs / full - (1 - skipped / STEPS)) / (skipped / STEPS)
    assert head < skipped_step < head + 0.05


def test_unsupported_calls_are_refused(unpatched):
    pipe, base = unpatched
    apply_firstblock(pipe, FirstBlockCache(threshold=10.0))
    try:
        with pytest.raises(ValueError, match="skip-layer guidance"):
            generate(pipe, num_inference_steps=STEPS, skip_guidance_layers=[1])
    finally:
        remove_firstblock(pipe)
    np.testing.assert_array_equal(generate(pipe, num_inference_steps=STEPS), base)


def test_settings_are_validated():
    assert FirstBlockCache().threshold == 0.05
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="threshold must be >= 0"):
            FirstBlockCache(threshold=bad)
