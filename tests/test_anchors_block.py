"""Block level: an anchor step (`cat_block_forward(..., text_cached=True)`) against diffusers'
own `JointTransformerBlock`.

After a recording pass fills the joint K/V cache, an anchor step computes only the selected
image tokens: attention reads the text K/V the recording left in the cache, and only the
anchors' image K/V are rewritten. With the text and the other image tokens as the recording
saw them, the anchors' outputs are exactly the real block's on the same inputs."""

from __future__ import annotations

import pytest
import torch

from catpatch.caches import BlockCache, StepIndex
from catpatch.models.shapes import build_transformer
from catpatch.sd3 import cat_block_forward, gather_tokens

TOL = dict(atol=1e-5, rtol=1e-4)
ROWS, TOKENS, TEXT, BUDGET = 2, 64, 7, 9
# tiny-sd3.5-medium: blocks 0 and 1 dual attention, block 3 the last (context_pre_only)
BLOCKS = {"dual": 0, "plain": 2, "last": 3}


def _scatter(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    for r in range(x.shape[0]):
        out[r, index[r]] = values[r]
    return out


def _anchor_step(which: str, moved: bool):
    """Record on (h0, ctx), then an anchor step whose anchors' inputs are new when `moved`
    (and whose text states are then other ones too: an anchor step must not read them);
    -> what the test compares."""
    torch.manual_seed(0)
    model = build_transformer("tiny-sd3.5-medium")
    block = model.transformer_blocks[BLOCKS[which]]
    dim = model.inner_dim
    h0, ctx = torch.randn(ROWS, TOKENS, dim), torch.randn(ROWS, TEXT, dim)
    temb = torch.randn(ROWS, dim)
    index = torch.stack([torch.randperm(TOKENS)[:BUDGET].sort().values for _ in range(ROWS)])
    h1 = _scatter(h0, index, torch.randn(ROWS, BUDGET, dim)) if moved else h0
    given = torch.randn(ROWS, TEXT, dim) if moved else ctx
    cache = BlockCache()
    with torch.no_grad():
        cat_block_forward(block, cache, h0, ctx, temb)  # the recording step (fills cache.kv)
        recorded = cache.kv.clone()
        step = StepIndex.of(index, TOKENS, TEXT)
        text, image = cat_block_forward(
            block, cache, gather_tokens(h1, index), given, temb, step, text_cached=True
        )
        real = block(hidden_states=h1, encoder_hidden_states=ctx, temb=temb)
        fresh = BlockCache()
        cat_block_forward(block, fresh, h1, ctx, temb)  # what a recording of h1 would cache
    return dict(
        block=block, given=given, index=index, text=text, image=image, real=real,
        cache=cache, recorded=recorded, fresh=fresh,
    )  # fmt: skip


@pytest.mark.parametrize("moved", [False, True], ids=["same-inputs", "anchors-moved"])
@pytest.mark.parametrize("which", list(BLOCKS))
def test_anchor_outputs_equal_the_real_block(which, moved):
    run = _anchor_step(which, moved)
    assert run["block"].use_dual_attention == (which == "dual")
    assert run["block"].context_pre_only == (which == "last")
    index = run["index"]
    assert run["image"].shape == (ROWS, BUDGET, run["given"].shape[-1])
    torch.testing.assert_close(run["image"], gather_tokens(run["real"][1], index), **TOL)
    # the text stream is not computed: returned as given (None after the last block); the
    # anchors attended to the recorded text (the real block ran on that)
    if which == "last":
        assert run["text"] is None
    else:
        assert run["text"] is run["given"]


@pytest.mark.parametrize("which", list(BLOCKS))
def test_anchor_step_writes_only_the_anchors_image_kv(which):
    run = _anchor_step(which, moved=True)
    kv, recorded, index = run["cache"].kv, run["recorded"], run["index"]
    # text rows: exactly what the recording step left
    assert torch.equal(kv[:, :, TOKENS:], recorded[:, :, TOKENS:])
    anchors = torch.zeros(ROWS, TOKENS, dtype=torch.bool)
    for r in range(ROWS):
        anchors[r, index[r]] = True
    # image rows: the anchors hold K/V of their new inputs, every other token its recorded K/V
    for half in (0, 1):
        image, before = kv[half, :, :TOKENS], recorded[half, :, :TOKENS]
        assert torch.equal(image[~anchors], before[~anchors])
        torch.testing.assert_close(
            image[anchors], run["fresh"].kv[half, :, :TOKENS][anchors], **TOL
        )
        assert not torch.allclose(image[anchors], before[anchors])  # the check has teeth
    if which == "dual":  # the image-only second attention: the same, in its own cache
        for name in ("key2", "value2"):
            got, want = getattr(run["cache"], name), getattr(run["fresh"], name)
            torch.testing.assert_close(gather_tokens(got, index), gather_tokens(want, index), **TOL)
