"""FLUX at tensor and block level: rotary rows, and the pruned double- and single-stream blocks
against diffusers' own blocks (all tokens: equal; a subset: the selected rows equal the real
block's rows when the others' K/V are cached from the same input)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from catpatch.caches import BlockCache, StepIndex, gather_positions, gather_tokens
from catpatch.flux import double_block_forward, rotate, single_block_forward
from catpatch.models.shapes import build_transformer

ROWS, HEIGHT, WIDTH, TEXT, DIM = 2, 6, 8, 5, 32
TOKENS = HEIGHT * WIDTH


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's position ids: text all zeros, image (0, row, col) in raster order (float)."""
    img = torch.zeros(HEIGHT, WIDTH, 3)
    img[..., 1] += torch.arange(HEIGHT)[:, None]
    img[..., 2] += torch.arange(WIDTH)[None, :]
    return torch.zeros(TEXT, 3), img.reshape(-1, 3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_transformer("tiny-flux")


def _inputs(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, TOKENS, DIM, generator=gen)
    context = torch.randn(ROWS, TEXT, DIM, generator=gen)
    temb = torch.randn(ROWS, DIM, generator=gen)
    txt, img = _ids()
    rope = model.pos_embed(torch.cat([txt, img]))  # (T+L, d) each, [text, image]
    return hidden, context, temb, rope


def _selected_rope(rope, index: torch.Tensor):
    """What the adapter gives a pruned step: [all text rows, each row's selected image rows]."""
    return tuple(
        torch.cat(
            [t[:TEXT].expand(index.shape[0], TEXT, -1), gather_positions(t, index + TEXT)], dim=1
        )
        for t in rope
    )


def test_rotate_equals_diffusers_rotary_and_per_row_tables():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, TEXT + TOKENS, 2, 16, generator=gen)
    txt, img = _ids()
    model = build_transformer("tiny-flux")
    rope = model.pos_embed(torch.cat([txt, img]))
    expected = apply_rotary_emb(x, rope, sequence_dim=1)
    assert torch.equal(rotate(x, rope), expected)
    # per-row tables gathered for a subset: the rows of the full rotation
    index = torch.stack([torch.randperm(TOKENS, generator=gen)[:7].sort().values for _ in range(2)])
    picked = torch.cat([x[:, :TEXT], gather_tokens(x[:, TEXT:], index)], dim=1)
    got = rotate(picked, _selected_rope(rope, index))
    want = torch.cat([expected[:, :TEXT], gather_tokens(expected[:, TEXT:], index)], dim=1)
    assert torch.equal(got, want)


def test_gather_positions_is_per_row_table_lookup():
    table = torch.arange(12.0).view(6, 2)
    index = torch.tensor([[0, 5], [3, 3]])
    assert torch.equal(gather_positions(table, index), table[index])
    assert gather_positions(table, index).shape == (2, 2, 2)


def _block(model, single: bool, index: int = 0):
    return (model.single_transformer_blocks if single else model.transformer_blocks)[index]


def _forward(single: bool):
    return single_block_forward if single else double_block_forward


@pytest.mark.parametrize("single", [False, True], ids=["double", "single"])
@pytest.mark.parametrize("output_caches", [False, True], ids=["lean", "dense"])
def test_all_tokens_equal_the_real_block(model, single, output_caches):
    block = _block(model, single)
    hidden, context, temb, rope = _inputs(model)
    with torch.no_grad():
        ref_context, ref_hidden = block(hidden, context, temb, image_rotary_emb=rope)
        cache = BlockCache()
        got_context, got_hidden = _forward(single)(
            block, cache, hidden, context, temb, rope, output_caches=output_caches
        )
    torch.testing.assert_close(got_hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_context, ref_context, atol=1e-5, rtol=1e-5)
    assert cache.kv.shape == (2, ROWS, TOKENS + TEXT, DIM)
    assert (cache.attn is not None) == output_caches
    # every token "selected" on a pruned step: still the real block
    index = torch.arange(TOKENS).expand(ROWS, -1).contiguous()
    step = StepIndex.of(index, TOKENS, TEXT)
    with torch.no_grad():
        pruned_context, pruned_hidden = _forward(single)(
            block, cache, hidden, context, temb, _selected_rope(rope, index), step
        )
    torch.testing.assert_close(pruned_hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pruned_context, ref_context, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("single", [False, True], ids=["double", "single"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_selected_rows_equal_the_real_block_on_cached_kv(model, single, fused):
    """K/V of the unselected tokens cached from the same input: the selected tokens' outputs
    are the real block's rows, the text outputs are the real block's, and the cache ends as
    the full computation's; the dense residual stream gets every token's real output."""
    block = _block(model, single, 1)
    if fused:
        block.attn.fuse_projections()
    try:
        _check_subset(model, block, single)
    finally:
        if fused:
            block.attn.unfuse_projections()


def _check_subset(model, block, single: bool) -> None:
    if True:
        hidden, context, temb, rope = _inputs(model, seed=1)
        gen = torch.Generator().manual_seed(2)
        index = torch.stack(
            [torch.randperm(TOKENS, generator=gen)[:13].sort().values for _ in range(ROWS)]
        )
        step = StepIndex.of(index, TOKENS, TEXT)
        with torch.no_grad():
            ref_context, ref_hidden = block(hidden, context, temb, image_rotary_emb=rope)
            cache = BlockCache()
            _forward(single)(block, cache, hidden, context, temb, rope, output_caches=True)
            full_kv, full_attn = cache.kv.clone(), cache.attn.clone()
            # only the unselected tokens' K/V may come from the cache: the step writes the rest
            cache.kv[:, :, TOKENS:] = 0
            for r in range(ROWS):
                cache.kv[:, r, index[r]] = 0
            residual = hidden.clone()
            got_context, got_hidden = _forward(single)(
                block, cache, gather_tokens(hidden, index), context, temb,
                _selected_rope(rope, index), step, residual=residual,
            )  # fmt: skip
    torch.testing.assert_close(got_hidden, gather_tokens(ref_hidden, index), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_context, ref_context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.kv, full_kv, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache.attn, full_attn, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(residual, ref_hidden, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("single", [False, True], ids=["double", "single"])
def test_unselected_tokens_read_the_cache(model, single):
    """A pruned step's outputs depend on the cached K/V of tokens it does not compute."""
    block = _block(model, single)
    hidden, context, temb, rope = _inputs(model, seed=3)
    index = torch.arange(0, TOKENS, 3).expand(ROWS, -1).contiguous()
    step = StepIndex.of(index, TOKENS, TEXT)
    outs = []
    with torch.no_grad():
        for other in (hidden, torch.randn_like(hidden)):  # (layer norm ignores a scale)
            cache = BlockCache()
            _forward(single)(block, cache, other, context, temb, rope)
            outs.append(
                _forward(single)(
                    block, cache, gather_tokens(hidden, index), context, temb,
                    _selected_rope(rope, index), step,
                )[1]
            )  # fmt: skip
    assert (outs[0] - outs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("single", [False, True], ids=["double", "single"])
def test_pruned_block_compiles_as_one_graph(model, single):
    torch._dynamo.reset()
    block = _block(model, single)
    hidden, context, temb, rope = _inputs(model, seed=4)
    index = torch.stack([torch.randperm(TOKENS)[:11].sort().values for _ in range(ROWS)])
    step = StepIndex.of(index, TOKENS, TEXT)
    caches = [BlockCache(), BlockCache()]
    fn = _forward(single)
    args = (gather_tokens(hidden, index), context, temb, _selected_rope(rope, index), step)
    with torch.no_grad():
        for cache in caches:
            fn(block, cache, hidden, context, temb, rope)
        eager = fn(block, caches[0], *args, hidden.clone())
        graph = torch.compile(fn, fullgraph=True, dynamic=False)(
            block, caches[1], *args, hidden.clone()
        )
    torch._dynamo.reset()
    torch.testing.assert_close(graph[1], eager[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(graph[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].kv, caches[0].kv, atol=1e-5, rtol=1e-5)
