"""FLUX pipelines: three-way comparison, true CFG (two calls per step), guidance-distilled
batches, ControlNet, LoRA, CPU offload, bad input, and the cost model against torch's counter.

All on a tiny `FluxPipeline` built from configs (catpatch.models.tiny, shape "tiny-flux"; the
guidance-distilled layout "tiny-flux-dev"), no download.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_pipe
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats, remove_cat
from catpatch.flux import FluxDims, step_macs
from catpatch.models.shapes import build_transformer
from catpatch.patching import get_patch
from catpatch.stats import count_cpu_attention, measured_macs

CFG = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8)
EXACT = CFG.replace(keep_ratio=1.0)
TRUE_CFG = dict(true_cfg_scale=2.0, negative_prompt="a blue square")


def flux_pipe(shape: str = "tiny-flux", cls=None):
    return make_pipe(shape, cls)


def run(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    args = dict(
        prompt="a red circle", height=128, width=128, num_inference_steps=10,
        max_sequence_length=32, output_type="np", guidance_scale=3.5,
    )  # fmt: skip
    args.update(kwargs)
    return pipe(**args, generator=torch.Generator().manual_seed(seed)).images


def _instance_state(pipe) -> dict:
    modules = dict(pipe.transformer.named_modules())
    return {
        "pipe": set(vars(pipe)),
        "modules": {k: set(vars(m)) for k, m in modules.items()},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks)) for k, m in modules.items()
        },
    }


def _image_inputs(kind: str) -> dict:
    if kind == "text2img":
        return {}
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    kwargs = dict(image=image, strength=0.9, num_inference_steps=14)
    if kind == "inpaint":
        mask = torch.zeros(1, 1, 128, 128)
        mask[..., 32:96, 16:80] = 1.0
        kwargs.update(mask_image=mask)
    return kwargs


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint"])
def test_three_way(kind):
    cls = {"text2img": None, "img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}
    pipe = flux_pipe(cls=cls[kind])
    kwargs = _image_inputs(kind)
    a = run(pipe, **kwargs)
    before = _instance_state(pipe)
    apply_cat(pipe, EXACT)
    exact = run(pipe, **kwargs)
    assert cat_stats(pipe).pruned_steps > 0
    apply_cat(pipe, CFG)
    b = run(pipe, **kwargs)
    stats = cat_stats(pipe)
    remove_cat(pipe)
    c = run(pipe, **kwargs)
    assert np.array_equal(a, c), "removed patch must give the unpatched image bit for bit"
    assert _instance_state(pipe) == before, "remove_cat left something behind"
    np.testing.assert_allclose(exact, a, atol=1e-5)  # keep_ratio 1: the model
    change = np.abs(a - b).max()
    assert 1e-4 < change < 0.2, f"pruning changed the image by {change}"
    steps = pipe._num_timesteps
    assert stats.steps == steps and stats.pruned_steps == steps - CFG.warmup_steps
    assert (stats.tokens, stats.budget, stats.rows, stats.calls_per_step) == (256, 76, 1, 1)
    assert stats.computed_fraction < 1.0 and stats.macs < stats.macs_unpatched


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "dense"])
@pytest.mark.parametrize("shape", ["tiny-flux", "tiny-flux-dev"])
def test_keep_all_tokens_is_the_model(shape, lean):
    pipe = flux_pipe(shape)
    a = run(pipe)
    apply_cat(pipe, EXACT.replace(lean=lean))
    b = run(pipe)
    assert cat_stats(pipe).pruned_steps == 6
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_true_cfg_counts_steps_not_calls():
    """true_cfg_scale > 1 with a negative prompt: two transformer calls per step (B rows each,
    conditional then unconditional). The schedule counts steps, both calls run the step's mode,
    the unconditional call computes the conditional call's tokens on K/V caches of its own,
    and the selection advances once per step."""
    pipe = flux_pipe()
    a = run(pipe, **TRUE_CFG)
    assert np.abs(a - run(pipe)).max() > 1e-3, "true CFG does nothing"
    apply_cat(pipe, EXACT)
    np.testing.assert_allclose(run(pipe, **TRUE_CFG), a, atol=1e-5)

    apply_cat(pipe, CFG)
    state = get_patch(pipe).state
    begun, indices = [], []
    original = state.begin_pruned_step

    def begin():
        begun.append(state.schedule.step)
        return original()

    state.begin_pruned_step = begin
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, args, kw: indices.append(state.index.clone()) if state.index is not None
        and state.schedule.mode.value == "pruned" else None, with_kwargs=True,
    )  # fmt: skip
    try:
        b = run(pipe, **TRUE_CFG)
    finally:
        hook.remove()
        del state.begin_pruned_step
    stats = cat_stats(pipe)
    assert (stats.steps, stats.pruned_steps, stats.calls_per_step, stats.rows) == (10, 6, 2, 1)
    assert [m for m, *_ in stats.per_step] == ["full"] * 2 + ["reference", "record"] + [
        "pruned"
    ] * 6
    assert begun == [4, 5, 6, 7, 8, 9], "the selection must advance once per step"
    assert len(indices) == 12
    for cond, uncond in zip(indices[::2], indices[1::2], strict=True):
        assert torch.equal(cond, uncond), "the unconditional call computes other tokens"
    assert not torch.equal(indices[0], indices[2]), "the selection never changed"
    assert len(state.lanes) == 2 and state.lanes[1].previous is None  # freed at run end
    full = step_macs(FluxDims.from_config(pipe.transformer.config), 256, 32)
    assert stats.macs_unpatched == 2 * 10 * full
    change = np.abs(a - b).max()
    assert 1e-4 < change < 0.2, f"pruning changed the true-CFG image by {change}"
    remove_cat(pipe)
    assert np.array_equal(run(pipe, **TRUE_CFG), a)


def test_own_loop_with_two_calls_per_step():
    """`cat_generation(calls_per_step=2)`: a hand-written true-CFG loop counts steps."""
    torch.manual_seed(0)
    model = build_transformer("tiny-flux")
    apply_cat(model, CFG.replace(warmup_steps=2))
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(8, 8, 3)
    ids[..., 1] += torch.arange(8)[:, None]
    ids[..., 2] += torch.arange(8)[None, :]
    inputs = dict(img_ids=ids.view(-1, 3), txt_ids=torch.zeros(6, 3))
    prompts = [
        dict(encoder_hidden_states=torch.randn(1, 6, 32, generator=gen),
             pooled_projections=torch.randn(1, 32, generator=gen))
        for _ in range(2)
    ]  # fmt: skip
    with torch.no_grad(), cat_generation(model, num_inference_steps=5, calls_per_step=2):
        for step in range(5):
            x = torch.randn(1, 64, 16, generator=gen)
            for prompt in prompts:
                model(hidden_states=x, timestep=torch.full((1,), 1 - step / 5), **prompt, **inputs)
    stats = cat_stats(model)
    assert (stats.steps, stats.pruned_steps, stats.calls_per_step) == (5, 3, 2)
    assert get_patch(model).state.log.geometry.height == 8
    with pytest.raises(ValueError, match="calls_per_step"), cat_generation(model, calls_per_step=0):
        pass


def test_guidance_distilled_batch_is_per_sample():
    """FLUX.1-dev layout (guidance embedding, no CFG pair): one row per image, each selects
    on its own; swapping the prompts of a batch swaps the images."""
    pipe = flux_pipe("tiny-flux-dev")
    apply_cat(pipe, CFG)
    prompts = ["a red circle", "a blue square on a striped background"]
    latents = torch.randn(2, 256, 16, generator=torch.Generator().manual_seed(5))
    ab = run(pipe, prompt=prompts, latents=latents)
    stats = cat_stats(pipe)
    assert (stats.rows, stats.pruned_steps) == (2, 6)
    chosen = get_patch(pipe).state.chosen
    assert chosen is None or chosen.shape == (2, 76)
    ba = run(pipe, prompt=prompts[::-1], latents=latents.flip(0))
    np.testing.assert_allclose(ab[0], ba[1], atol=2e-5)
    np.testing.assert_allclose(ab[1], ba[0], atol=2e-5)


def test_selection_differs_per_sample():
    pipe = flux_pipe("tiny-flux-dev")
    apply_cat(pipe, CFG.replace(persistent_buffers=True))
    latents = torch.randn(2, 256, 16, generator=torch.Generator().manual_seed(6))
    run(pipe, prompt=["a red circle", "a green star"], latents=latents)
    chosen = get_patch(pipe).state.chosen
    assert chosen.shape == (2, 76) and not torch.equal(chosen[0], chosen[1])


def test_non_square_resolution():
    pipe = flux_pipe()
    apply_cat(pipe, CFG)
    img = run(pipe, height=96, width=160)
    assert img.shape == (1, 96, 160, 3) and np.isfinite(img).all()
    geo = get_patch(pipe).state.log.geometry
    assert (geo.height, geo.width) == (12, 20)  # read from the pipeline's img_ids
    assert cat_stats(pipe).pruned_steps == 6


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
    """diffusers' model offload hooks (accelerate) next to ours; the execution device is the
    CPU here, so this checks that the hooks compose and results hold."""
    reference = flux_pipe()
    apply_cat(reference, CFG)
    expected = run(reference)
    pipe = flux_pipe()
    if order == "offload_first":
        pipe.enable_model_cpu_offload(device="cpu")
        apply_cat(pipe, CFG)
    else:
        apply_cat(pipe, CFG)
        pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(run(pipe), expected, atol=1e-5)
    assert cat_stats(pipe).pruned_steps == 6
    remove_cat(pipe)
    np.testing.assert_allclose(run(pipe), run(flux_pipe()), atol=1e-5)


def test_bad_input_leaves_pipe_untouched():
    from diffusers import FluxKontextPipeline
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    pipe = flux_pipe()
    run(pipe, num_inference_steps=2)
    before = _instance_state(pipe)
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
    assert _instance_state(pipe) == before
    # the token forecast keeps one output per step: refused on a true-CFG step's second call
    apply_cat(pipe, CFG.replace(token_order=1))
    with pytest.raises(NotImplementedError, match="true CFG"):
        run(pipe, **TRUE_CFG)
    run(pipe)  # the patch still serves one call per step
    assert cat_stats(pipe).pruned_steps > 0
    remove_cat(pipe)
    assert _instance_state(pipe) == before


@pytest.mark.parametrize("selection,reuse_order", [("step", 0), ("step", 1), ("cat+reuse", 1)])
def test_step_reuse_under_true_cfg_keeps_each_calls_outputs(selection, reuse_order):
    """Step reuse (the default policy) with true CFG, two calls per step: a skipped step gives
    the conditional call the conditional history and the unconditional call its own."""
    pipe = flux_pipe()
    config = CATConfig(selection=selection, warmup_steps=4, num_clusters=8, reuse_macs=0.6)
    apply_cat(pipe, config.replace(reuse_order=reuse_order))
    outputs = []  # (step, call, output) of every transformer call
    state, where = get_patch(pipe).state, []

    def start(module, args, kwargs):  # after catpatch's own pre-hook has placed the call
        where.append((state.schedule.step, state.schedule.call))

    def keep(module, args, kwargs, output):
        outputs.append((*where.pop(), output[0].clone()))

    hooks = [
        pipe.transformer.register_forward_pre_hook(start, with_kwargs=True),
        pipe.transformer.register_forward_hook(keep, with_kwargs=True),
    ]
    try:
        run(pipe, **TRUE_CFG)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(outputs) == 2 * 10 and {c for _, c, _ in outputs} == {0, 1}
    stats = cat_stats(pipe)
    assert stats.calls_per_step == 2 and stats.reused_steps > 0
    skipped = [s for s, (mode, _, _) in enumerate(stats.per_step) if mode == "reuse"]
    computed = {(s, c): o for s, c, o in outputs if s not in skipped}
    for step in skipped:
        for call in (0, 1):
            got = next(o for s, c, o in outputs if (s, c) == (step, call))
            before = sorted(s for s, c in computed if c == call and s < step)
            s1, s2 = before[-1], before[-2]
            v1, v2 = computed[(s1, call)], computed[(s2, call)]
            expected = v1 if reuse_order == 0 else v1 + (v1 - v2) * (step - s1) / (s1 - s2)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    remove_cat(pipe)


def test_ip_adapter_projection_is_refused():
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    pipe = flux_pipe()
    pipe.transformer.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=8, cross_attention_dim=32, num_image_text_embeds=4)]
    )
    with pytest.raises(TypeError, match="IP-Adapter.*unload_ip_adapter"):
        apply_cat(pipe, CFG)
    assert get_patch(pipe) is None


def test_cat_stats_against_hand_calculation():
    """tiny-flux by hand: D=32, 2 double + 2 single blocks, 16 features in and out per
    token, T5 width 32, pooled 32, no guidance embedding, T=32, L=256, S=76."""
    pipe = flux_pipe()
    apply_cat(pipe, CFG.replace(lean=False))
    run(pipe)
    stats = cat_stats(pipe)
    D, L, T, S = 32, 256, 32, 76
    outer = L * 16 * D + T * 32 * D + (256 * D + D * D) + (32 * D + D * D) + 2 * D * D

    def blocks(n):
        attention = 2 * D * (n + T) * (L + T)
        double = 12 * D * D * (n + T) + attention + 12 * D * D
        single = 12 * D * D * (n + T) + attention + 3 * D * D
        return 2 * double + 2 * single

    full = outer + L * D * 16 + blocks(L)
    pruned = outer + L * D * 16 + blocks(S)
    assert stats.macs_unpatched == 10 * full
    assert stats.macs == 4 * full + 6 * pruned
    apply_cat(pipe, CFG)
    run(pipe)
    lean = outer + S * D * 16 + blocks(S)
    assert cat_stats(pipe).macs == 4 * full + 6 * lean


count_cpu_attention()


@pytest.mark.parametrize("shape", ["tiny-flux", "tiny-flux-dev"])
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "dense"])
def test_macs_match_flop_counter(shape, lean):
    """The cost model is exact for the matrix products torch counts, for full, recording and
    pruned calls (`stats.measured_macs`, inside `FluxTransformer2DModel` only)."""
    pipe = flux_pipe(shape)
    config = CFG.replace(lean=lean)
    apply_cat(pipe, config)
    model = pipe.transformer
    measured = measured_macs(lambda: run(pipe), module="FluxTransformer2DModel")
    stats = cat_stats(pipe)
    assert measured == stats.macs, f"{measured / stats.macs:.4f}x the cost model"
    dims = FluxDims.from_config(model.config)
    assert stats.macs_unpatched == 10 * step_macs(dims, 256, 32)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_true_cfg_in_image_pipelines(kind):
    """The image pipelines run true CFG without diffusers' cache context: the progress bar
    still ends each step, so both calls share it."""
    cls = {"img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}[kind]
    pipe = flux_pipe(cls=cls)
    kwargs = {**_image_inputs(kind), **TRUE_CFG}
    a = run(pipe, **kwargs)
    apply_cat(pipe, EXACT)
    np.testing.assert_allclose(run(pipe, **kwargs), a, atol=1e-5)
    apply_cat(pipe, CFG)
    b = run(pipe, **kwargs)
    stats = cat_stats(pipe)
    steps = pipe._num_timesteps
    assert (stats.steps, stats.calls_per_step) == (steps, 2)
    assert stats.pruned_steps == steps - CFG.warmup_steps
    assert 1e-4 < np.abs(a - b).max() < 0.2


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
