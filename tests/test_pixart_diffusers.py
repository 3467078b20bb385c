"""diffusers' PixArt-Σ fast-test checks, our own version, with CAT applied.

diffusers' `tests/pipelines/pixart_sigma/test_pixart.py` cannot run here: its components load
`hf-internal-testing/tiny-random-t5` from the hub (no network), its expected image slices belong
to that checkpoint's weights, and its `PipelineTesterMixin` is not in the diffusers wheel. These
tests rebuild its components offline (its transformer config, a default `AutoencoderKL`,
`DDIMScheduler`, a tiny T5 of its caption width) and make its key checks on a CAT-patched
pipeline, with enough steps to prune (its 2 steps end inside the warm-up).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat

CFG = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=2, num_clusters=4)
EXACT = CFG.replace(keep_ratio=1.0)
STEPS = 6


def components() -> dict:
    """diffusers' dummy PixArt-Σ components, offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtTransformer2DModel

    from catpatch.models.tiny import t5_encoder, t5_tokenizer

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKL()
    tokenizer = t5_tokenizer()
    return dict(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler(),
        text_encoder=t5_encoder(tokenizer, d_model=32), tokenizer=tokenizer,
    )  # fmt: skip


def make():
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(**components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(seed: int = 0, **changes) -> dict:
    args = dict(
        prompt="a painting of a cat eating a tree", generator=torch.Generator().manual_seed(seed),
        num_inference_steps=STEPS, guidance_scale=5.0, use_resolution_binning=False,
        output_type="np", clean_caption=False,
    )  # fmt: skip
    return {**args, **changes}


def _np(x) -> np.ndarray:
    return x.float().numpy() if isinstance(x, torch.Tensor) else x


def three_way(pipe, **changes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unpatched, CAT at keep_ratio 1.0, CAT at 0.3); the pipe is left unpatched and its
    unpatched output checked bit for bit after remove_cat."""
    a = pipe(**inputs(**changes)).images
    apply_cat(pipe, EXACT)
    exact = pipe(**inputs(**changes)).images
    apply_cat(pipe, CFG)
    b = pipe(**inputs(**changes)).images
    assert cat_stats(pipe).pruned_steps == STEPS - CFG.warmup_steps
    remove_cat(pipe)
    assert np.array_equal(_np(pipe(**inputs(**changes)).images), _np(a))
    tol = 5e-2 if a.dtype == torch.bfloat16 else 1e-5
    np.testing.assert_allclose(_np(exact), _np(a), atol=tol)
    assert np.isfinite(_np(b)).all() and b.shape == a.shape
    return a, exact, b


def test_inference():
    a, _, b = three_way(make())
    assert a.shape == (1, 8, 8, 3) and np.abs(a - b).max() > 1e-5


def test_inference_non_square_images():
    a, _, _ = three_way(make(), height=32, width=48)
    assert a.shape == (1, 32, 48, 3)


def test_inference_with_multiple_images_per_prompt():
    a, _, _ = three_way(make(), num_images_per_prompt=2)
    assert a.shape == (2, 8, 8, 3)


def test_inference_batch_single_identical():
    """Each image of a batch equals the same image made alone (per-sample selection)."""
    pipe = make()
    apply_cat(pipe, CFG)
    prompts = ["a red circle", "a green star on a striped background"]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    batch = pipe(**inputs(prompt=prompts, latents=latents)).images
    for i, prompt in enumerate(prompts):
        single = pipe(**inputs(prompt=prompt, latents=latents[i : i + 1])).images
        np.testing.assert_allclose(batch[i], single[0], atol=1e-3)


def test_inference_with_embeddings_and_multiple_images(tmp_path):
    """Prompt embeddings instead of prompts, two images each, through save / load."""
    from diffusers import PixArtSigmaPipeline

    pipe = make()
    embeds, mask, negative, negative_mask = pipe.encode_prompt("a red circle")
    call = dict(
        prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
        negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask,
        num_images_per_prompt=2,
    )  # fmt: skip
    a, _, _ = three_way(pipe, **call)
    apply_cat(pipe, CFG)
    patched = pipe(**inputs(**call)).images
    pipe.save_pretrained(tmp_path)
    loaded = PixArtSigmaPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    apply_cat(loaded, CFG)
    np.testing.assert_allclose(loaded(**inputs(**call)).images, patched, atol=1e-4)
    assert a.shape == (2, 8, 8, 3)


def test_dict_tuple_outputs_equivalent():
    pipe = make()
    apply_cat(pipe, CFG)
    as_dict = pipe(**inputs()).images
    as_tuple = pipe(**inputs(return_dict=False))[0]
    np.testing.assert_array_equal(as_dict, as_tuple)


def test_fused_qkv_projections():
    """fuse_qkv_projections (FusedAttnProcessor2_0: one QKV linear for self-attention, one KV
    linear for cross-attention): CAT reads the fused projections."""
    pipe = make()
    original = pipe(**inputs()).images
    pipe.transformer.fuse_qkv_projections()
    a, _, b = three_way(pipe)
    np.testing.assert_allclose(a, original, atol=1e-3)
    apply_cat(pipe, CFG)
    fused_pruned = pipe(**inputs()).images
    remove_cat(pipe)
    pipe.transformer.unfuse_qkv_projections()
    apply_cat(pipe, CFG)
    np.testing.assert_allclose(pipe(**inputs()).images, fused_pruned, atol=1e-3)
    np.testing.assert_array_equal(b, fused_pruned)


def test_layerwise_casting():
    """fp8 weight storage with fp32 compute (diffusers' layerwise casting hooks every linear):
    CAT computes through the hooked modules."""
    pipe = make()
    pipe.transformer.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32
    )
    three_way(pipe)


def test_half_precision_latents():
    pipe = make().to(torch.bfloat16)
    a, _, b = three_way(pipe, output_type="latent")
    assert a.dtype == b.dtype == torch.bfloat16


def test_attention_slicing_forward_pass():
    """Attention slicing leaves PixArt's processors as they are (diffusers slices UNets): the
    patched pipeline gives the same image with it."""
    pipe = make()
    apply_cat(pipe, CFG)
    plain = pipe(**inputs()).images
    pipe.enable_attention_slicing(slice_size=1)
    np.testing.assert_allclose(pipe(**inputs()).images, plain, atol=1e-5)


def test_processor_set_after_apply_is_refused_with_the_fix():
    """A processor set after apply_cat would be bypassed on pruned steps: the next run's first
    call refuses it, naming the fix, and the pipe works again once it is restored."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = make()
    apply_cat(pipe, CFG)
    processors = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor(AttnProcessor())
    with pytest.raises(TypeError, match=r"AttnProcessor at .*set_attn_processor"):
        pipe(**inputs())
    pipe.transformer.set_attn_processor(processors)
    assert np.isfinite(pipe(**inputs()).images).all() and cat_stats(pipe).pruned_steps == 4
