"""The checks of diffusers' own FluxPipeline tests, run with CAT applied (our equivalents).

diffusers' `tests/pipelines/flux/test_pipeline_flux.py` cannot run here: its components come
from hub repositories (tiny random CLIP/T5 configs and tokenizers) and its harness from
diffusers' test tree, neither of which is installed or downloadable. These tests re-state what
its `FluxPipeline` checks assert, written for this repository (no diffusers test code), on the
offline tiny-flux pipeline, each with CAT at keep_ratio 1.0 (must equal the unpatched pipeline)
and at 0.3 with enough steps to prune (must prune and keep the contract).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_support import CFG, flux_pipe

from catpatch import apply_cat, cat_stats

STEPS = 8
CONFIGS = {"keep1": CFG.replace(keep_ratio=1.0), "keep0.3": CFG}


def _inputs(**changes):
    args = dict(
        prompt="a red circle", num_inference_steps=STEPS, guidance_scale=5.0, height=64,
        width=64, max_sequence_length=48, output_type="pt",
    )  # fmt: skip
    args.update(changes)
    return args


def _run(pipe, seed: int = 0, **changes):
    return pipe(**_inputs(**changes), generator=torch.Generator().manual_seed(seed)).images


@pytest.fixture(scope="module")
def reference():
    return flux_pipe()


@pytest.fixture(params=list(CONFIGS))
def patched(request):
    pipe = flux_pipe()
    apply_cat(pipe, CONFIGS[request.param])
    return request.param, pipe


def _check(name, pipe, reference, **changes):
    """keep1: the unpatched pipeline's output; keep0.3: pruned, finite, close."""
    got, want = _run(pipe, **changes), _run(reference, **changes)
    assert got.shape == want.shape and torch.isfinite(got).all()
    if name == "keep1":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert cat_stats(pipe).pruned_steps == STEPS - CFG.warmup_steps
        assert (got - want).abs().max() < 0.2
    return got


def test_different_prompts(patched, reference):
    name, pipe = patched
    same = _check(name, pipe, reference)
    other = _check(name, pipe, reference, prompt_2="a different prompt")
    assert (same - other).abs().max() > 1e-6, "prompt_2 must change the output"


@pytest.mark.parametrize("height,width", [(32, 32), (72, 57)])
def test_image_output_shape(patched, reference, height, width):
    name, pipe = patched
    image = _check(name, pipe, reference, height=height, width=width)
    unit = pipe.vae_scale_factor * 2
    assert image.shape[-2:] == (height - height % unit, width - width % unit)


def test_true_cfg(patched, reference):
    name, pipe = patched
    plain = _check(name, pipe, reference)
    true_cfg = _check(name, pipe, reference, negative_prompt="bad quality", true_cfg_scale=2.0)
    assert not torch.allclose(plain, true_cfg), "true_cfg_scale must change the output"
    assert cat_stats(pipe).calls_per_step == 2 and cat_stats(pipe).steps == STEPS


def test_negative_embeds_shape_check(patched):
    """A bad call raises the pipeline's own error, and the patch serves the next call."""
    _, pipe = patched
    embeds = dict(
        prompt_embeds=torch.randn(1, 4, 32), pooled_prompt_embeds=torch.randn(1, 32),
        negative_prompt_embeds=torch.randn(1, 5, 32),
        negative_pooled_prompt_embeds=torch.randn(1, 32),
        height=32, width=32, num_inference_steps=STEPS, output_type="latent",
    )  # fmt: skip
    with pytest.raises(ValueError, match="must have the same shape"):
        pipe(**embeds, true_cfg_scale=2.0, generator=torch.manual_seed(0))
    pipe(**embeds, true_cfg_scale=1.0, generator=torch.manual_seed(0))
    assert cat_stats(pipe).steps == STEPS


def test_num_images_per_prompt_and_batches(patched, reference):
    name, pipe = patched
    images = _check(
        name, pipe, reference, prompt=["a red circle", "a tree"], num_images_per_prompt=2
    )
    assert images.shape[0] == 4 and cat_stats(pipe).rows == 4


def test_prompt_embeds_equal_prompt(patched):
    _, pipe = patched
    embeds, pooled, _ = pipe.encode_prompt("a red circle", prompt_2=None, max_sequence_length=48)
    by_text = _run(pipe)
    by_embeds = _run(pipe, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    torch.testing.assert_close(by_embeds, by_text, atol=1e-6, rtol=1e-6)


def test_callback_on_step_end_changes_latents(patched):
    _, pipe = patched

    def zero_last(p, i, t, kwargs):
        if i == STEPS - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    latents = _run(pipe, output_type="latent", callback_on_step_end=zero_last)
    assert torch.count_nonzero(latents) == 0
    assert cat_stats(pipe).steps == STEPS


def test_latent_output_decodes_like_pt(patched):
    _, pipe = patched
    image = _run(pipe)
    latents = _run(pipe, output_type="latent")
    latents = pipe._unpack_latents(latents, 64, 64, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    decoded = pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pt")
    assert np.allclose(decoded.detach().numpy(), image.numpy(), atol=1e-5)
