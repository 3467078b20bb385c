"""PixArt-Σ at the block level: the pruned block against diffusers' `BasicTransformerBlock`,
the whole pruned step against a literal reading of the specification, the block compiled as one
graph and a pruned step without host syncs (mirrors test_block and test_compile for SD3).
"""

from __future__ import annotations

import copy

import pytest
import torch
from pixart_support import CFG, SHAPE, TOL, model_inputs

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats
from catpatch.caches import BlockCache, StepIndex, gather_tokens
from catpatch.models.shapes import build_transformer
from catpatch.patching import get_patch
from catpatch.pixart import cat_block_forward
from catpatch.pixart.adapter import _noise_channels


# ---- tensors ----------------------------------------------------------------------------------
def test_noise_channels_are_what_the_pipeline_keeps():
    """The drift reads per token exactly the values the pipeline keeps of a learned-sigma
    output: unpatchify (diffusers' einsum) then the first C of 2·C channels."""
    rows, h, w, p, c = 2, 3, 5, 2, 4
    output = torch.randn(rows, h * w, p * p * 2 * c)
    image = torch.einsum("nhwpqc->nchpwq", output.view(rows, h, w, p, p, 2 * c))
    kept = image.reshape(rows, 2 * c, h * p, w * p).chunk(2, dim=1)[0]
    noise = _noise_channels(output, p, c)
    again = torch.einsum("nhwpqc->nchpwq", noise.reshape(rows, h, w, p, p, c))
    assert torch.equal(again.reshape(rows, c, h * p, w * p), kept)


# ---- the pruned block against diffusers' BasicTransformerBlock --------------------------------
def _scatter(x, index, values):
    out = x.clone()
    for r in range(x.shape[0]):
        out[r, index[r]] = values[r]
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_pruned_block_equals_basic_transformer_block_on_cached_kv(masked):
    torch.manual_seed(0)
    model = build_transformer(SHAPE)
    block = model.transformer_blocks[1]
    rows, tokens, text, dim, budget = 2, 64, 7, 32, 19
    h0, ctx = torch.randn(rows, tokens, dim), torch.randn(rows, text, dim)
    temb = torch.randn(rows, 6 * dim)
    mask = None
    if masked:  # the pipeline's T5 padding mask, as the transformer turns it into a bias
        keep = torch.ones(rows, text)
        keep[0, 5:] = 0
        mask = ((1 - keep) * -10000.0).unsqueeze(1)
    kwargs = dict(encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=temb)
    cache = BlockCache()
    with torch.no_grad():
        # recording step (all tokens): fills the caches, equals the block itself
        ref = block(h0, **kwargs)
        out = cat_block_forward(block, cache, h0, ctx, temb, mask)
        torch.testing.assert_close(out, ref, **TOL)
        assert cache.kv.shape == (2, rows, tokens, dim)
        old = copy.deepcopy(cache)

        # pruned step: new values for a different subset of tokens in each row
        index = torch.stack([torch.randperm(tokens)[:budget].sort().values for _ in range(rows)])
        h1 = _scatter(h0, index, torch.randn(rows, budget, dim))
        residual = h1.clone()
        step = StepIndex.of(index, tokens, 0)
        got = cat_block_forward(
            block, cache, gather_tokens(h1, index), ctx, temb, mask, step=step, residual=residual
        )
        # the real block on the mixed input: unselected tokens keep h0, so their K/V are
        # exactly the cached ones
        ref = block(h1, **kwargs)
    torch.testing.assert_close(got, gather_tokens(ref, index), **TOL)
    check = BlockCache()
    with torch.no_grad():
        cat_block_forward(block, check, h1, ctx, temb, mask)
    torch.testing.assert_close(cache.kv, check.kv, **TOL)  # K/V of h1 for every token
    # dense residual stream: computed tokens equal the block output; the others add their
    # cached self-attention, cross-attention and FFN outputs under this step's gates
    torch.testing.assert_close(gather_tokens(residual, index), got, **TOL)
    gates = (block.scale_shift_table[None] + temb.reshape(rows, 6, -1)).chunk(6, dim=1)
    expected = h1 + gates[2] * old.attn + old.attn2 + gates[5] * old.ff
    unselected = torch.ones(rows, tokens, dtype=torch.bool)
    for r in range(rows):
        unselected[r, index[r]] = False
    torch.testing.assert_close(residual[unselected], expected[unselected], **TOL)


def test_all_tokens_selected_is_the_block_bit_for_bit():
    torch.manual_seed(0)
    block = build_transformer(SHAPE).transformer_blocks[0]
    rows, tokens, dim = 2, 48, 32
    h, ctx, temb = torch.randn(rows, tokens, dim), torch.randn(rows, 5, dim), torch.randn(2, 192)
    cache = BlockCache()
    with torch.no_grad():
        cat_block_forward(block, cache, h, ctx, temb)
        index = torch.arange(tokens).expand(rows, tokens)
        got = cat_block_forward(block, cache, h, ctx, temb, step=StepIndex.of(index, tokens, 0))
        ref = block(h, encoder_hidden_states=ctx, timestep=temb)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


# ---- the whole pruned step against a literal reading of the specification ---------------------
def _attention(q, k, v, heads):
    """softmax(QK^T / sqrt(d)) V per head, written out (independent of SDPA)."""
    rows, nq, dim = q.shape
    q, k, v = (t.view(rows, -1, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(rows, nq, dim)


def _literal_step(model, caches, index, latents, context, timestep):
    """Spec §3 on PixArt, literally: every token walks the residual stream of every block;
    only T_s gets self-attention Q/K/V, cross-attention and FFN; the others read the per-block
    output caches (self-attention, cross-attention, FFN), which this updates in place."""
    rows = latents.shape[0]
    h = model.pos_embed(latents)
    temb, embedded = model.adaln_single(
        timestep, {"resolution": None, "aspect_ratio": None}, batch_size=rows,
        hidden_dtype=h.dtype,
    )  # fmt: skip
    c = model.caption_projection(context)
    for block, cache in zip(model.transformer_blocks, caches, strict=True):
        table = block.scale_shift_table[None] + temb.reshape(rows, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.chunk(6, dim=1)
        n = gather_tokens(block.norm1(h) * (1 + scale_msa) + shift_msa, index)
        attn = block.attn1
        keys = _scatter(cache.kv[0], index, attn.to_k(n))
        values = _scatter(cache.kv[1], index, attn.to_v(n))
        out = attn.to_out[0](_attention(attn.to_q(n), keys, values, attn.heads))
        cache.attn = _scatter(cache.attn, index, out)
        h = h + gate_msa * cache.attn
        q = block.attn2.to_q(gather_tokens(h, index))
        k, v = block.attn2.to_k(c), block.attn2.to_v(c)
        cross = block.attn2.to_out[0](_attention(q, k, v, block.attn2.heads))
        cache.attn2 = _scatter(cache.attn2, index, cross)
        h = h + cache.attn2
        m = gather_tokens(block.norm2(h) * (1 + scale_mlp) + shift_mlp, index)
        cache.ff = _scatter(cache.ff, index, block.ff(m))
        h = h + gate_mlp * cache.ff
    return h, embedded


def test_pruned_step_matches_literal_spec():
    """A whole pruned call (no CFG: every row selects its own tokens, --no-lean): the dense
    stream reaching norm_out, the raw projection and the returned output (computed tokens from
    this step, the others from the previous one) match the literal spec; the caches are
    updated as it updates them."""
    torch.manual_seed(1)
    model = build_transformer(SHAPE)
    apply_cat(model, CFG.replace(warmup_steps=3, num_clusters=6, lean=False))
    state = get_patch(model).state
    rows = 3
    inputs = dict(
        encoder_hidden_states=torch.randn(rows, 9, 64),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    seen, finals = {}, []
    model.norm_out.register_forward_pre_hook(lambda m, a: seen.update(dense=a[0].clone()))
    model.proj_out.register_forward_hook(lambda m, a, o: seen.update(raw=o.clone()), prepend=True)
    model.proj_out.register_forward_hook(lambda m, a, o: finals.append(o.clone()))
    with torch.no_grad(), cat_generation(model):
        for step in range(5):
            latents = torch.randn(rows, 4, 16, 16)
            timestep = torch.full((rows,), 900 - 150 * step)
            if step == 4:
                caches = copy.deepcopy(state.caches.blocks)
                index = state.schedule.rows_of(state.chosen).clone()
            model(hidden_states=latents, timestep=timestep, **inputs)
            if step == 4:
                after = [copy.copy(c) for c in state.caches.blocks]
        dense, embedded = _literal_step(
            model, caches, index, latents, inputs["encoder_hidden_states"], timestep
        )
    torch.testing.assert_close(seen["dense"], dense, atol=1e-4, rtol=1e-4)
    shift, scale = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
    raw = model.proj_out(model.norm_out(dense) * (1 + scale) + shift)
    torch.testing.assert_close(seen["raw"], raw, atol=1e-4, rtol=1e-4)
    expected = _scatter(finals[3], index, gather_tokens(raw, index))
    torch.testing.assert_close(finals[4], expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(finals[4], raw)
    for got, want in zip(after, caches, strict=True):
        for name in ("attn", "attn2", "ff"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), **TOL)


# ---- the block compiled, a pruned step without host syncs -------------------------------------
def test_pruned_block_compiles_as_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = build_transformer(SHAPE).transformer_blocks[1]
    rows, tokens, dim = 2, 64, 32
    h, ctx, temb = torch.randn(rows, tokens, dim), torch.randn(rows, 7, dim), torch.randn(2, 192)
    index = torch.stack([torch.randperm(tokens)[:19].sort().values for _ in range(rows)])
    caches = [BlockCache(), BlockCache()]
    with torch.no_grad():
        for cache in caches:
            cat_block_forward(block, cache, h, ctx, temb)
        compiled = torch.compile(cat_block_forward, fullgraph=True, dynamic=False)
        h1 = torch.randn(rows, tokens, dim)
        args = (gather_tokens(h1, index), ctx, temb)
        step = StepIndex.of(index, tokens, 0)
        eager = cat_block_forward(block, caches[0], *args, step=step, residual=h1.clone())
        graph = compiled(block, caches[1], *args, step=step, residual=h1.clone())
    torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].kv, caches[0].kv, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("cfg,lean", [(True, True), (True, False), (False, True)])
def test_pruned_step_has_no_host_sync(cfg, lean):
    """A whole pruned transformer call (hooks, pruned blocks, output replacement, the next
    selection) reads no tensor value on the host."""
    from test_guards import NoHostSync

    torch.manual_seed(0)
    model = build_transformer(SHAPE)
    apply_cat(
        model, CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=2, num_clusters=4, lean=lean)
    )
    rows, steps = 2, 5
    inputs = model_inputs(rows)
    with torch.no_grad(), cat_generation(model, num_inference_steps=steps, cfg=cfg):
        for step in range(steps):
            latents = torch.randn(rows // 2 if cfg else rows, 4, 16, 16)
            args = dict(
                hidden_states=torch.cat([latents] * 2) if cfg else latents,
                timestep=torch.full((rows,), 900 - 100 * step),
                **inputs,
            )
            if step < 2:
                model(**args)  # warm-up: clustering and set-up may sync
                continue
            with NoHostSync():
                model(**args)
    assert cat_stats(model).pruned_steps == 3
