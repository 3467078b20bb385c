"""diffusers' TaylorSeerCache on SD3 pipelines through `catpatch.peers.taylorseer` (a peer)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import generate, make_pipe

from catpatch.peers.taylorseer import TaylorSeer, apply_taylorseer, remove_taylorseer
from catpatch.stats import ModelDims, measured_macs, run_macs


def test_sd3_pipelines_cannot_run_taylorseer_as_shipped():
    """Why the module exists: diffusers' hook on an SD3 pipeline finds no cache context."""
    import torch
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    pipe = make_pipe()
    config = TaylorSeerCacheConfig(cache_interval=2, taylor_factors_dtype=torch.float32)
    apply_taylorseer_cache(pipe.transformer, config)
    with pytest.raises(ValueError, match="cache context"):
        generate(pipe)


@pytest.mark.parametrize("lite", [False, True])
def test_taylorseer_runs_resets_and_is_removed(lite):
    pipe = make_pipe("tiny-sd3.5-medium")  # dual attention blocks included
    base = generate(pipe)
    apply_taylorseer(pipe, TaylorSeer(cache_interval=3, warmup_steps=3, lite=lite))
    with pytest.raises(ValueError, match="already applied"):
        apply_taylorseer(pipe)
    first, second = generate(pipe), generate(pipe)
    remove_taylorseer(pipe)
    restored = generate(pipe)
    np.testing.assert_array_equal(first, second)  # each generation starts from fresh state
    assert np.abs(first - base).max() > 1e-4, "TaylorSeer forecast nothing"
    assert np.abs(first - base).mean() < 0.05
    np.testing.assert_array_equal(restored, base)


MODEL = "SD3Transformer2DModel"


def test_taylorseer_macs_are_counted_as_ours():
    """The FLOP counter's MACs of an unpatched run equal the cost model's within 1%; the
    forecast steps of TaylorSeer cost less, the lite ones (whole steps) less still."""
    pipe = make_pipe()
    steps, seen = 10, []

    def shapes(module, args, kwargs):
        seen.append((kwargs["hidden_states"].shape, kwargs["encoder_hidden_states"].shape))

    handle = pipe.transformer.register_forward_pre_hook(shapes, with_kwargs=True)
    unpatched = measured_macs(lambda: generate(pipe, num_inference_steps=steps), MODEL)
    handle.remove()
    (rows, _, height, width), (_, text, _) = seen[0]
    tokens = height * width // pipe.transformer.config.patch_size**2
    dims = ModelDims.from_config(pipe.transformer.config)
    _, model = run_macs(dims, rows, tokens, text, tokens, steps, 0)
    ratios = {}
    for lite in (False, True):
        apply_taylorseer(pipe, TaylorSeer(cache_interval=3, warmup_steps=3, lite=lite))
        run = measured_macs(lambda: generate(pipe, num_inference_steps=steps), MODEL)
        ratios[lite] = run / unpatched
        remove_taylorseer(pipe)
    assert model == pytest.approx(unpatched, rel=0.01)
    assert ratios[True] < ratios[False] < 0.95
