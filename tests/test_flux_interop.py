"""FLUX next to other pipelines and add-ons: ControlNet, Fill and Control pipelines, LoRA,
diffusers' model CPU offload, and what is refused (unsupported pipelines, processors, IP-Adapter)
with the pipeline left untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import check_model_cpu_offload, instance_state
from flux_support import CFG, EXACT, TRUE_CFG, flux_pipe, run

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat
from catpatch.patching import get_patch


def _controlnet_pipe():
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    base = flux_pipe()
    torch.manual_seed(3)
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6],
    ).eval()  # fmt: skip
    for p in controlnet.parameters():  # zero-initialised outputs: wake them up
        p.data.normal_(0, 0.05)
    pipe = FluxControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "dense"])
def test_controlnet_pipeline_three_way(lean):
    pipe = _controlnet_pipe()
    control = dict(control_image=torch.rand(1, 3, 128, 128), controlnet_conditioning_scale=1.0)

    def go(**changes):
        torch.manual_seed(0)
        return run(pipe, **{**control, **changes})

    a = go()
    assert np.abs(a - go(controlnet_conditioning_scale=0.0)).max() > 1e-3, "inert ControlNet"
    apply_cat(pipe, EXACT.replace(lean=lean))
    np.testing.assert_allclose(go(), a, atol=1e-5)
    apply_cat(pipe, CFG.replace(lean=lean))
    b = go()
    assert cat_stats(pipe).pruned_steps == 6 and np.isfinite(b).all()
    assert np.abs(b - go(controlnet_conditioning_scale=0.0)).max() > 1e-3
    remove_cat(pipe)
    np.testing.assert_array_equal(go(), a)
    assert np.abs(a - b).max() > 1e-4


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = flux_pipe()
    torch.manual_seed(7)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "ff.net.2"],
    )  # fmt: skip
    pipe.transformer.add_adapter(config)
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("flux-lora")
    FluxPipeline.save_lora_weights(
        path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    return path


@pytest.mark.parametrize("order", ["lora_first", "cat_first"])
def test_lora_before_and_after_apply(lora_dir, order):
    base = run(flux_pipe())
    reference = flux_pipe()
    reference.load_lora_weights(lora_dir, adapter_name="toy")
    with_lora = run(reference)
    assert np.abs(with_lora - base).max() > 1e-3, "the LoRA does nothing"
    pipe = flux_pipe()
    if order == "lora_first":
        pipe.load_lora_weights(lora_dir, adapter_name="toy")
        apply_cat(pipe, EXACT)
    else:
        apply_cat(pipe, EXACT)
        pipe.load_lora_weights(lora_dir, adapter_name="toy")
    np.testing.assert_allclose(run(pipe), with_lora, atol=1e-5)
    half = dict(joint_attention_kwargs={"scale": 0.5})
    np.testing.assert_allclose(run(pipe, **half), run(reference, **half), atol=1e-5)
    apply_cat(pipe, CFG)
    pruned_lora = run(pipe)
    assert cat_stats(pipe).pruned_steps == 6
    pipe.disable_lora()
    assert np.abs(pruned_lora - run(pipe)).max() > 1e-3, "the LoRA does nothing when pruned"


@pytest.mark.parametrize("order", ["offload_first", "cat_first"])
def test_model_cpu_offload_hooks_and_cat(order):
    """diffusers' model offload hooks (accelerate) next to ours, in either order."""
    check_model_cpu_offload(order, flux_pipe, run, CFG)


@pytest.mark.parametrize("kind", ["fill", "control"])
def test_fill_and_control_pipelines_three_way(kind):
    """FluxFillPipeline / FluxControlPipeline: the condition is concatenated to the latents'
    channels before the embedding (transformer in_channels 96 / 32, out 16), so the pruned
    path is the same; unpatched a, keep 1.0 = a, pruned b, removed c = a bit for bit."""
    from diffusers import FluxControlPipeline, FluxFillPipeline

    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    if kind == "fill":
        mask = torch.zeros(1, 1, 128, 128)
        mask[..., 32:96, 16:80] = 1.0
        cls, channels, extra = FluxFillPipeline, 96, dict(image=image, mask_image=mask)
    else:
        cls, channels, extra = FluxControlPipeline, 32, dict(control_image=image)
    from catpatch.models.tiny import build_pipeline

    pipe = build_pipeline("tiny-flux", pipeline_cls=cls, in_channels=channels, out_channels=16)
    pipe.set_progress_bar_config(disable=True)
    a = run(pipe, **extra)
    apply_cat(pipe, EXACT)
    np.testing.assert_allclose(run(pipe, **extra), a, atol=1e-5)
    apply_cat(pipe, CFG)
    b = run(pipe, **extra)
    stats = cat_stats(pipe)
    remove_cat(pipe)
    assert np.array_equal(run(pipe, **extra), a)
    assert (stats.pruned_steps, stats.tokens) == (6, 256)
    assert 1e-4 < np.abs(a - b).max() < 0.2


def test_bad_input_leaves_pipe_untouched():
    from diffusers import FluxKontextPipeline
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    pipe = flux_pipe()
    run(pipe, num_inference_steps=2)
    before = instance_state(pipe)
    with pytest.raises(TypeError, match="does not support FluxKontextPipeline"):
        apply_cat(FluxKontextPipeline(**pipe.components), CFG)
    original = dict(pipe.transformer.attn_processors)
    name = next(iter(original))
    processors = dict(original)
    processors[name] = FluxIPAdapterAttnProcessor(32, 32, num_tokens=(4,))
    pipe.transformer.set_attn_processor(processors)
    with pytest.raises(TypeError, match="FluxIPAdapterAttnProcessor.*set_attn_processor"):
        apply_cat(pipe, CFG)
    pipe.transformer.set_attn_processor(dict(original))
    with pytest.raises(ValueError, match="keep_ratio"):
        apply_cat(pipe, CATConfig(selection="cat", keep_ratio=0))
    assert instance_state(pipe) == before
    # the token forecast keeps one output per step: refused on a true-CFG step's second call
    apply_cat(pipe, CFG.replace(token_order=1))
    with pytest.raises(NotImplementedError, match="true CFG"):
        run(pipe, **TRUE_CFG)
    run(pipe)  # the patch still serves one call per step
    assert cat_stats(pipe).pruned_steps > 0
    remove_cat(pipe)
    assert instance_state(pipe) == before


def test_ip_adapter_projection_is_refused():
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    pipe = flux_pipe()
    pipe.transformer.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=8, cross_attention_dim=32, num_image_text_embeds=4)]
    )
    with pytest.raises(TypeError, match="IP-Adapter.*unload_ip_adapter"):
        apply_cat(pipe, CFG)
    assert get_patch(pipe) is None
