"""Together with what SD3 users already use: PEFT LoRA, CPU offload, ControlNet, compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generate, make_pipe

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat
from catpatch.patching import get_patch

CFG = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8)
EXACT = CFG.replace(keep_ratio=1.0)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A tiny LoRA for the tiny-sd3 transformer, made with PEFT and saved like any LoRA."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make_pipe()
    torch.manual_seed(7)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
    )
    pipe.transformer.add_adapter(config)
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a LoRA that visibly changes the image
    path = tmp_path_factory.mktemp("lora")
    StableDiffusion3Pipeline.save_lora_weights(
        path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    return path


@pytest.mark.parametrize("order", ["lora_first", "cat_first"])
def test_lora_before_and_after_apply(lora_dir, order):
    base = generate(make_pipe())
    reference = make_pipe()
    reference.load_lora_weights(lora_dir, adapter_name="toy")
    with_lora = generate(reference)
    assert np.abs(with_lora - base).max() > 1e-3, "the LoRA does nothing"

    pipe = make_pipe()
    if order == "lora_first":
        pipe.load_lora_weights(lora_dir, adapter_name="toy")
        apply_cat(pipe, EXACT)
    else:
        apply_cat(pipe, EXACT)
        pipe.load_lora_weights(lora_dir, adapter_name="toy")
    np.testing.assert_allclose(generate(pipe), with_lora, atol=1e-5)
    assert cat_stats(pipe).pruned_steps == 6
    # pruned for real, the LoRA still acts on the computed tokens
    apply_cat(pipe, CFG)
    pruned_lora = generate(pipe)
    pipe.disable_lora()
    pruned_plain = generate(pipe)
    assert np.abs(pruned_lora - pruned_plain).max() > 1e-3


def test_lora_scale_adapters_fuse_unload_while_patched(lora_dir):
    reference, pipe = make_pipe(), make_pipe()
    for p in (reference, pipe):
        p.load_lora_weights(lora_dir, adapter_name="toy")
    apply_cat(pipe, EXACT)
    half = dict(joint_attention_kwargs={"scale": 0.5})
    np.testing.assert_allclose(generate(pipe, **half), generate(reference, **half), atol=1e-5)
    assert np.abs(generate(pipe, **half) - generate(pipe)).max() > 1e-4, "scale ignored"

    for p in (reference, pipe):
        p.set_adapters(["toy"], adapter_weights=[0.3])
    np.testing.assert_allclose(generate(pipe), generate(reference), atol=1e-5)

    for p in (reference, pipe):
        p.fuse_lora(lora_scale=1.0)
    np.testing.assert_allclose(generate(pipe), generate(reference), atol=1e-5)
    for p in (reference, pipe):
        p.unfuse_lora()
        p.unload_lora_weights()
    np.testing.assert_allclose(generate(pipe), generate(make_pipe()), atol=1e-5)
    assert get_patch(pipe) is not None and cat_stats(pipe).pruned_steps == 6


def test_fused_qkv_projections():
    # SD3-medium layout: diffusers' fused processor skips the qk-norm of SD3.5 (CAT applies
    # it, as the unfused model does) and fails on SD3.5-medium's image-only attn2
    pipe = make_pipe("tiny-sd3")
    pipe.transformer.fuse_qkv_projections()
    fused = generate(pipe)
    apply_cat(pipe, EXACT)
    np.testing.assert_allclose(generate(pipe), fused, atol=1e-5)
    apply_cat(pipe, CFG)
    assert np.isfinite(generate(pipe)).all() and cat_stats(pipe).pruned_steps == 6


def _sequential_offload_transformer(pipe, device="cpu"):
    # What enable_sequential_cpu_offload does to each model, applied to the transformer only:
    # on a CPU-only machine the full-pipeline call fails inside the CLIP text encoder
    # (accelerate + transformers), before CAT is involved.
    import accelerate

    accelerate.cpu_offload(pipe.transformer, execution_device=torch.device(device))


@pytest.mark.parametrize("offload", ["model", "sequential"])
@pytest.mark.parametrize("order", ["offload_first", "cat_first"])
def test_cpu_offload_hooks_and_cat(offload, order):
    """diffusers' offload hooks (accelerate) next to ours. On this CPU-only machine the
    execution device is the CPU: this checks that the hooks compose and results hold;
    the memory saving itself needs an accelerator."""
    reference = make_pipe()
    apply_cat(reference, CFG)
    expected = generate(reference)

    pipe = make_pipe()
    if offload == "model":
        enable = pipe.enable_model_cpu_offload
    else:
        enable = lambda device: _sequential_offload_transformer(pipe, device)  # noqa: E731
    if order == "offload_first":
        enable(device="cpu")
        apply_cat(pipe, CFG)
    else:
        apply_cat(pipe, CFG)
        enable(device="cpu")
    np.testing.assert_allclose(generate(pipe), expected, atol=1e-5)
    assert cat_stats(pipe).pruned_steps == 6
    remove_cat(pipe)
    np.testing.assert_allclose(generate(pipe), generate(make_pipe()), atol=1e-5)


def _controlnet_pipe(inpaint: bool = False):
    """A tiny SD3 ControlNet pipeline; `inpaint`: the ControlNet-inpainting one (its
    ControlNet takes the masked image latents plus the mask: one extra input channel)."""
    from diffusers import (
        SD3ControlNetModel,
        StableDiffusion3ControlNetInpaintingPipeline,
        StableDiffusion3ControlNetPipeline,
    )

    from catpatch.models.shapes import transformer_config

    base = make_pipe()
    torch.manual_seed(3)
    config = transformer_config("tiny-sd3")
    controlnet = SD3ControlNetModel(
        num_layers=2, extra_conditioning_channels=int(inpaint), **{k: config[k] for k in (
            "sample_size", "patch_size", "in_channels", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
            "pooled_projection_dim", "out_channels", "pos_embed_max_size")},
    ).eval()  # fmt: skip
    for p in controlnet.parameters():  # ControlNet output layers start at zero: wake them up
        p.data.normal_(0, 0.05)
    cls = StableDiffusion3ControlNetPipeline
    if inpaint:
        cls = StableDiffusion3ControlNetInpaintingPipeline
    pipe = cls(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_controlnet_pipeline():
    pipe = _controlnet_pipe()
    control = dict(control_image=torch.rand(1, 3, 128, 128), controlnet_conditioning_scale=1.0)

    def generate_control(pipe, **kwargs):
        torch.manual_seed(0)  # the pipeline samples the control image latents without a generator
        return generate(pipe, **kwargs)

    base = generate_control(pipe, **control)
    without = generate_control(pipe, **{**control, "controlnet_conditioning_scale": 0.0})
    assert np.abs(base - without).max() > 1e-3, "the ControlNet does nothing"
    apply_cat(pipe, EXACT)
    np.testing.assert_allclose(generate_control(pipe, **control), base, atol=1e-5)
    apply_cat(pipe, CFG)
    pruned = generate_control(pipe, **control)
    assert cat_stats(pipe).pruned_steps == 6 and np.isfinite(pruned).all()
    off = generate_control(pipe, **{**control, "controlnet_conditioning_scale": 0.0})
    assert np.abs(pruned - off).max() > 1e-3, "the ControlNet does nothing on pruned steps"
    remove_cat(pipe)
    np.testing.assert_array_equal(generate_control(pipe, **control), base)


def test_controlnet_inpainting_pipeline_three_way():
    """StableDiffusion3ControlNetInpaintingPipeline: unpatched a, patched b, removed c."""
    pipe = _controlnet_pipe(inpaint=True)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:96, 48:112] = 1.0
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    control = dict(control_image=image, control_mask=mask, controlnet_conditioning_scale=1.0)

    def run(**changes):
        torch.manual_seed(0)  # the pipeline encodes the control image without a generator
        return generate(pipe, **{**control, **changes})

    a = run()
    assert np.abs(a - run(controlnet_conditioning_scale=0.0)).max() > 1e-3, "inert ControlNet"
    apply_cat(pipe, CFG)
    b = run()
    stats = cat_stats(pipe)
    off = run(controlnet_conditioning_scale=0.0)
    remove_cat(pipe)
    c = run()
    np.testing.assert_array_equal(a, c)  # removed: the unpatched pipeline bit for bit
    assert np.abs(a - b).max() > 1e-4 and np.isfinite(b).all()
    assert np.abs(b - off).max() > 1e-3, "the ControlNet does nothing on pruned steps"
    assert (stats.steps, stats.pruned_steps, stats.rows) == (10, 6, 2)
    assert stats.budget == 76 and 0 < stats.computed_fraction < 1 and stats.macs_ratio < 1
