"""What one FLUX run or call must not carry into another: the token grid across runs, and the
caches of the two calls of a true-CFG step (conditional, then unconditional), read directly."""

from __future__ import annotations

import pytest
import torch
from conftest import make_pipe

from catpatch import CATConfig, apply_cat, cat_stats
from catpatch.patching import get_patch

TRUE_CFG = dict(true_cfg_scale=2.0, negative_prompt="a blue square")


def _run(pipe, **kwargs):
    args = dict(prompt="a red circle", height=128, width=128, num_inference_steps=10,
                max_sequence_length=32, output_type="np", guidance_scale=3.5)  # fmt: skip
    return pipe(**{**args, **kwargs}, generator=torch.Generator().manual_seed(0)).images


def test_token_grid_is_read_again_each_run():
    """96x160 then 160x96: the same token count, the transposed grid. The second run must read
    its own img_ids, not keep the first run's (12, 20)."""
    pipe = make_pipe("tiny-flux")
    apply_cat(pipe, CATConfig(selection="cat", warmup_steps=4, num_clusters=8))
    state = get_patch(pipe).state
    for height, width in ((96, 160), (160, 96), (96, 160)):
        assert _run(pipe, height=height, width=width).shape == (1, height, width, 3)
        geometry = state.log.geometry
        assert (geometry.height, geometry.width) == (height // 8, width // 8)
        assert cat_stats(pipe).pruned_steps == 6


def _watch_calls(pipe, read):
    """Run with true CFG, calling `read(step, call, output)` after each transformer call."""
    state = get_patch(pipe).state
    where = []

    def start(module, args, kwargs):  # after catpatch's own pre-hook has placed the call
        where.append((state.schedule.step, state.schedule.call))

    def end(module, args, kwargs, output):
        read(*where.pop(), output[0])

    hooks = [pipe.transformer.register_forward_pre_hook(start, with_kwargs=True),
             pipe.transformer.register_forward_hook(end, with_kwargs=True)]  # fmt: skip
    try:
        _run(pipe, **TRUE_CFG)
    finally:
        for hook in hooks:
            hook.remove()


def _snapshot(lane) -> list[torch.Tensor]:
    return [t.clone() for t in lane.tensors()]


def test_true_cfg_calls_keep_token_caches_apart():
    """CAT under true CFG: after each call of a pruned step, that call's lane holds its own
    output, and the unconditional call leaves every tensor of the conditional call's lane
    (K/V and output caches, last output) as the conditional call left it."""
    pipe = make_pipe("tiny-flux")
    apply_cat(pipe, CATConfig(selection="cat", warmup_steps=4, num_clusters=8, lean=False))
    state = get_patch(pipe).state
    seen, after_cond = [], {}

    def read(step, call, output):
        if state.log.steps[-1].mode.value != "pruned" or step != state.schedule.step:
            return
        lanes = state.lanes
        assert len(lanes) == 2 and lanes[call] is state.caches
        torch.testing.assert_close(lanes[call].previous, output, rtol=0, atol=0)
        if call == 0:
            after_cond[step] = _snapshot(lanes[0])
        else:
            mine = {t.untyped_storage().data_ptr() for t in lanes[1].tensors()}
            theirs = {t.untyped_storage().data_ptr() for t in lanes[0].tensors()}
            assert not mine & theirs, "the two calls' caches share memory"
            kept = after_cond[step]
            assert len(kept) == len(lanes[0].tensors()) > 2
            for before, now in zip(kept, lanes[0].tensors(), strict=True):
                assert torch.equal(before, now), "the unconditional call wrote the first lane"
            assert not torch.equal(lanes[0].previous, lanes[1].previous)
        seen.append((step, call))

    _watch_calls(pipe, read)
    assert seen == [(s, c) for s in range(4, 10) for c in (0, 1)]


@pytest.mark.parametrize("reuse_order", [0, 1])
def test_true_cfg_calls_keep_step_histories_apart(reuse_order):
    """Step reuse under true CFG: the step policy's history of each call holds that call's own
    outputs, and the unconditional call never changes the conditional call's history."""
    pipe = make_pipe("tiny-flux")
    config = CATConfig(selection="step", warmup_steps=4, reuse_macs=0.6, reuse_order=reuse_order)
    apply_cat(pipe, config)
    policy = get_patch(pipe).state.steps
    computed = {}  # (step, call) -> output of a computed call

    def read(step, call, output):
        if not policy.runs_model(step):
            return
        computed[(step, call)] = output.clone()
        history = policy.history
        (last_step, last), _ = history[call]
        assert last_step == step and torch.equal(last, output)
        if call == 1:  # the conditional history is the conditional call's, untouched
            (cond_step, cond), _ = history[0]
            assert cond_step == step and torch.equal(cond, computed[(step, 0)])
            assert not torch.equal(cond, last)

    _watch_calls(pipe, read)
    assert cat_stats(pipe).reused_steps > 0 and len(computed) == 2 * (
        10 - cat_stats(pipe).reused_steps
    )
