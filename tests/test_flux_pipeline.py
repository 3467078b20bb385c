"""FLUX pipelines: the three-way comparison (text-to-image, img2img, inpaint), true CFG (two
calls per step) in each, guidance-distilled batches, a hand-written loop, non-square images and
step reuse under true CFG.

All on a tiny `FluxPipeline` built from configs (tests/flux_support.py), no download.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import instance_state
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline
from flux_support import CFG, EXACT, TRUE_CFG, flux_pipe, image_inputs, run

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats, remove_cat
from catpatch.flux import FluxDims, step_macs
from catpatch.models.shapes import build_transformer
from catpatch.patching import get_patch


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint"])
def test_three_way(kind):
    cls = {"text2img": None, "img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}
    pipe = flux_pipe(cls=cls[kind])
    kwargs = image_inputs(kind)
    a = run(pipe, **kwargs)
    before = instance_state(pipe)
    apply_cat(pipe, EXACT)
    exact = run(pipe, **kwargs)
    assert cat_stats(pipe).pruned_steps > 0
    apply_cat(pipe, CFG)
    b = run(pipe, **kwargs)
    stats = cat_stats(pipe)
    remove_cat(pipe)
    c = run(pipe, **kwargs)
    assert np.array_equal(a, c), "removed patch must give the unpatched image bit for bit"
    assert instance_state(pipe) == before, "remove_cat left something behind"
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


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_true_cfg_in_image_pipelines(kind):
    """The image pipelines run true CFG without diffusers' cache context: the progress bar
    still ends each step, so both calls share it."""
    cls = {"img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}[kind]
    pipe = flux_pipe(cls=cls)
    kwargs = {**image_inputs(kind), **TRUE_CFG}
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
