"""The pruned PixArt block: `BasicTransformerBlock.forward` (norm_type "ada_norm_single") for
the computed tokens only.

On the recording step every token is computed and the caches are filled; on a pruned step only
the S selected image tokens go through the self-attention projections, the cross-attention to
the text and the FFN; self-attention reads the K/V of all L image tokens from the cache (the
computed tokens' K/V are written into it in place). The adaLN-single modulation is per token, so
it runs on the computed tokens as the model runs it on all. Mirrors diffusers'
`BasicTransformerBlock` and `AttnProcessor2_0` op for op (same float ops, same order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..blocks import linear_into, store
from ..caches import ALL_ROWS, BlockCache, StepIndex, keep, write_rows


def _mask(attn, mask: Tensor | None, keys: int, batch: int) -> Tensor | None:
    """The attention bias as `AttnProcessor2_0` prepares it: (batch, heads, 1 or N, keys)."""
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, keys, batch)
    return mask.view(batch, attn.heads, -1, mask.shape[-1])


def _kv_into_cache(attn, x: Tensor, kv: Tensor, step: StepIndex) -> None:
    """The computed tokens' K and V written into the (2, R, L, D) cache `kv` with one
    `index_copy_`: computed straight into one (2, R·S, D) stage when the projections are plain
    linears (see `catpatch.blocks.linear_into`), else computed as usual and stacked."""
    stage = x.new_empty(2, x.shape[0] * x.shape[1], kv.shape[-1])
    if not (linear_into(attn.to_k, x, stage[0]) and linear_into(attn.to_v, x, stage[1])):
        stage = torch.stack([attn.to_k(x), attn.to_v(x)]).view(stage.shape)
    write_rows(kv, step.kv, stage)


def self_attention(
    attn,
    x: Tensor,
    cache: BlockCache,
    step: StepIndex | None,
    keep_all=keep,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Self-attention of the computed image tokens `x` (R, N, D) against the K/V of all L image
    tokens, kept in `cache.kv` (2, R, L, D). With `step` None every token is computed and the
    cache is (re)filled through `keep_all`; otherwise the computed tokens' K/V are written in
    place first. Mirrors diffusers' `AttnProcessor2_0` (and `FusedAttnProcessor2_0`)."""
    fused = getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None)
    if fused:
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    if step is None:
        if not fused:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        cache.kv = keep_all(cache.kv, torch.stack([k, v]))
    elif fused or torch.compiler.is_compiling():
        if not fused:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        # one write (a second one makes inductor copy the whole cache)
        stacked = torch.cat([k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])])
        write_rows(cache.kv, step.kv, stacked)
    else:
        q = attn.to_q(x)
        _kv_into_cache(attn, x, cache.kv, step)
    keys, values = cache.kv
    return _attend(attn, x, q, keys, values, attention_mask)


def cross_attention(attn, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-attention of the computed image tokens `x` to the text `context`: each query on
    its own, so the computed tokens' rows of the real module's output. Mirrors diffusers'
    `AttnProcessor2_0` (and `FusedAttnProcessor2_0`)."""
    fused = getattr(attn, "fused_projections", False) and getattr(attn, "to_kv", None)
    q = attn.to_q(x)
    k, v = (
        attn.to_kv(context).chunk(2, dim=-1) if fused else (attn.to_k(context), attn.to_v(context))
    )
    return _attend(attn, x, q, k, v, mask)


def _attend(attn, x: Tensor, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None):
    """SDPA of (R, N, D) queries over (R, M, D) keys/values, output projection: the rest of
    `AttnProcessor2_0` (a division by `rescale_output_factor` 1.0 is skipped: the same values,
    one kernel fewer)."""
    rows, heads = x.shape[0], attn.heads
    mask = _mask(attn, mask, keys.shape[1], rows)
    q, keys, values = (
        t.view(rows, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, keys, values)
    )
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        # qk-norm on keys: the self-attention cache holds them un-normed, normed here
        keys = attn.norm_k(keys)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0)
    out = out.transpose(1, 2).reshape(rows, -1, heads * out.shape[-1]).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + x
    if attn.rescale_output_factor != 1.0:
        out = out / attn.rescale_output_factor
    return out


def _feed_forward(block, x: Tensor) -> Tensor:
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(block.ff, x, block._chunk_dim, block._chunk_size)
    return block.ff(x)


def cat_block_forward(
    block,
    cache: BlockCache,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    timestep: Tensor,
    encoder_attention_mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
    step: StepIndex | None = None,
    residual: Tensor | None = None,
    rows: slice = ALL_ROWS,
    keep_all=keep,
    output_caches: bool = True,
) -> Tensor:
    """`BasicTransformerBlock.forward` (ada_norm_single) for the computed tokens, reading and
    writing `cache`.

    `hidden_states` holds the computed tokens only (all L on the recording step, `step` None);
    `timestep` is adaLN-single's (R, 6·D) embedding. On the recording step the K/V cache is
    filled and, with `output_caches`, the driver rows' (`rows`) self-attention, cross-attention
    and FFN outputs (`attn`, `attn2`, `ff`). On a pruned step the computed tokens' K/V and
    outputs are written in place, and if the step keeps a dense `residual` stream (the driver
    rows of all L tokens; None when lean), every token's cached outputs are added to it under
    this step's gates.
    """
    if step is not None:
        rows, output_caches = step.rows, residual is not None
    batch = hidden_states.shape[0]
    table = block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)
    shift_msa, _, gate_msa, shift_mlp, _, gate_mlp = table.chunk(6, dim=1)
    # every 1 + scale from one kernel (elementwise: the same values as one per scale)
    one_plus = 1 + table
    scale_msa1, scale_mlp1 = one_plus[:, 1:2], one_plus[:, 4:5]
    normed = block.norm1(hidden_states)
    normed = normed * scale_msa1 + shift_msa

    attn_output = self_attention(block.attn1, normed, cache, step, keep_all, attention_mask)
    attn_all = store(cache, "attn", attn_output, step, rows, keep_all) if output_caches else None
    attn_output = gate_msa * attn_output
    hidden_states = attn_output + hidden_states

    cross = cross_attention(
        block.attn2, hidden_states, encoder_hidden_states, encoder_attention_mask
    )
    cross_all = store(cache, "attn2", cross, step, rows, keep_all) if output_caches else None
    hidden_states = cross + hidden_states

    normed = block.norm2(hidden_states)
    normed = normed * scale_mlp1 + shift_mlp
    ff_output = _feed_forward(block, normed)
    ff_all = store(cache, "ff", ff_output, step, rows, keep_all) if output_caches else None
    ff_output = gate_mlp * ff_output
    hidden_states = ff_output + hidden_states

    if step is not None and residual is not None:
        residual.addcmul_(gate_msa[rows], attn_all)
        residual.add_(cross_all)
        residual.addcmul_(gate_mlp[rows], ff_all)
    return hidden_states
