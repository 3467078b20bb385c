"""The pruned FLUX blocks: `FluxTransformerBlock` (double stream) and
`FluxSingleTransformerBlock` (single stream) for the computed image tokens only.

On the recording step every token is computed and the caches are filled; on a pruned step only
the S selected image tokens (plus all text tokens) go through the projections, the attention
queries, the MLPs and the output projections; attention reads the K/V of all L image tokens
from the cache, and the caches are updated in place. Mirrors diffusers' blocks and
`FluxAttnProcessor` (per-head RMS qk-norm, rotary embedding on [text, image] in that order,
fused QKV, fp16 clipping).

Rotary rows (`rope`): a (cos, sin) pair for the call's queries in [text, computed image]
order, (T+N, d) shared by all rows or (R, T+N, d) when each row computes its own tokens. K is
cached after its rotation, so a pruned step never needs the rows of tokens it does not compute.
The joint K/V cache is (2, R, L+T, D) with image tokens first, then text, as
`caches.StepIndex.kv` writes it (the attention is a sum over keys: their order is free).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..blocks import store
from ..caches import ALL_ROWS, BlockCache, StepIndex, keep, write_rows

Rope = tuple[Tensor, Tensor]


def rotate(x: Tensor, rope: Rope) -> Tensor:
    """diffusers' `apply_rotary_emb(x, rope, sequence_dim=1)` (interleaved real pairs) for x
    (..., R, N, H, d), with (N, d) or per-row (R, N, d) tables: the same float ops, so the
    same values (also for a stacked (2, R, N, H, d) query/key pair: one rotation for both)."""
    cos, sin = rope
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(x.device), sin[:, :, None, :].to(x.device)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _rotated_pair(q_parts: tuple[Tensor, ...], k_parts: tuple[Tensor, ...], rope: Rope):
    """rotate(cat(q_parts)), rotate(cat(k_parts)) along the tokens, as one rotation of the
    stacked pair: the rotation's eight elementwise kernels once per block instead of twice."""
    if len(q_parts) == 1:
        pair = torch.stack([q_parts[0], k_parts[0]])
    elif torch.compiler.is_compiling():
        pair = torch.stack([torch.cat(q_parts, dim=1), torch.cat(k_parts, dim=1)])
    else:  # each concatenation straight into its half
        first = q_parts[0]
        tokens = sum(p.shape[1] for p in q_parts)
        pair = first.new_empty(2, first.shape[0], tokens, *first.shape[2:])
        torch.cat(q_parts, dim=1, out=pair[0])
        torch.cat(k_parts, dim=1, out=pair[1])
    pair = rotate(pair, rope)
    return pair[0], pair[1]


def _projections(attn, x: Tensor, context: bool) -> tuple[Tensor, Tensor, Tensor]:
    fused = getattr(attn, "to_added_qkv" if context else "to_qkv", None)
    if getattr(attn, "fused_projections", False) and fused is not None:
        return fused(x).chunk(3, dim=-1)
    if context:
        return attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def _heads(attn, q: Tensor, k: Tensor, v: Tensor, context: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(R, N, D) projections -> (R, N, H, d), q and k RMS-normed per head."""
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    norm_q, norm_k = (
        (attn.norm_added_q, attn.norm_added_k) if context else (attn.norm_q, attn.norm_k)
    )
    return norm_q(q), norm_k(k), v


def joint_kv_rows(step: StepIndex, rows: int) -> Tensor:
    """(2, R·(T+N)): the rows of the flattened (2·R·(L+T), D) K/V cache that this call's K and
    V take in FLUX's token order, [text, computed image] per batch row (`StepIndex.kv` lists
    them image first). A few small kernels: the adapter makes it once per step."""
    k_image, k_text, v_image, v_text = (p.view(rows, -1) for p in step.kv_parts())
    return torch.stack([torch.cat([k_text, k_image], 1), torch.cat([v_text, v_image], 1)]).view(
        2, -1
    )


def _cached_attention(
    q: Tensor, k: Tensor, values: Tensor | tuple[Tensor, Tensor], text: int, cache: BlockCache,
    step: StepIndex | None, kv_rows: Tensor | None, keep_all,
) -> Tensor:  # fmt: skip
    """Attention of the queries q (R, T+N, H, d) ([text, computed image], rotated) over the
    cached K/V of all tokens, after writing this call's K `k` (same order) and V `values`
    (R, T+N, H, d) or its (text, image) parts into the cache; -> (R, T+N, H·d)."""
    rows, heads = q.shape[0], q.shape[2]
    joint = values if isinstance(values, Tensor) else None
    if step is None:
        # recording: the whole cache from this call, image first then text
        v = joint if joint is not None else torch.cat(values, dim=1)
        halves = [torch.cat([t[:, text:], t[:, :text]], dim=1).flatten(2) for t in (k, v)]
        cache.kv = keep_all(cache.kv, torch.stack(halves))
    else:
        kv_rows = joint_kv_rows(step, rows) if kv_rows is None else kv_rows
        if torch.compiler.is_compiling():
            # one write (a second one into a graph input makes inductor copy the whole cache)
            v = joint if joint is not None else torch.cat(values, dim=1)
            write_rows(cache.kv, kv_rows.view(-1), torch.stack([k, v]).flatten(3))
        else:  # eager: no concatenated copy, the parts go straight to their rows
            write_rows(cache.kv, kv_rows[0], k.flatten(2))
            if joint is not None:
                write_rows(cache.kv, kv_rows[1], joint.flatten(2))
            else:
                _, _, v_image, v_text = step.kv_parts()
                write_rows(cache.kv, v_text, values[0].flatten(2))
                write_rows(cache.kv, v_image, values[1].flatten(2))
    keys, values = (t.view(rows, t.shape[1], heads, -1).transpose(1, 2) for t in cache.kv)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, dropout_p=0.0)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


def double_block_forward(
    block,
    cache: BlockCache,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    temb: Tensor,
    rope: Rope,
    step: StepIndex | None = None,
    residual: Tensor | None = None,
    rows: slice = ALL_ROWS,
    keep_all=keep,
    output_caches: bool = True,
    kv_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`FluxTransformerBlock.forward` for the computed image tokens, reading/writing `cache`.

    `hidden_states` holds the computed tokens only (all L on the recording step, `step` None);
    `rope` the rotary rows of [text, computed image]. With `output_caches` the recording step
    keeps the driver rows' (`rows`) image attention / FFN outputs; on a pruned step with a
    dense `residual` stream (the driver rows of all L tokens) the gated cached outputs of every
    token are added to it. `kv_rows`: `joint_kv_rows(step, R)` if already made for this step.
    -> (encoder_hidden_states, hidden_states), as diffusers.
    """
    if step is not None:
        rows, output_caches = step.rows, residual is not None
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    normed_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
        encoder_hidden_states, emb=temb
    )
    attn, text = block.attn, encoder_hidden_states.shape[1]
    q, k, v = _heads(attn, *_projections(attn, normed, context=False), context=False)
    cq, ck, cv = _heads(attn, *_projections(attn, normed_context, context=True), context=True)
    q, k = _rotated_pair((cq, q), (ck, k), rope)
    out = _cached_attention(q, k, (cv, v), text, cache, step, kv_rows, keep_all)
    context_attn_output, attn_output = out[:, :text], out[:, text:]
    attn_output = attn.to_out[1](attn.to_out[0](attn_output.contiguous()))
    context_attn_output = attn.to_add_out(context_attn_output.contiguous())

    attn_all = store(cache, "attn", attn_output, step, rows, keep_all) if output_caches else None
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    normed = block.norm2(hidden_states)
    normed = normed * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ff_output = block.ff(normed)
    ff_all = store(cache, "ff", ff_output, step, rows, keep_all) if output_caches else None
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output
    if step is not None and residual is not None:
        residual.addcmul_(gate_msa[rows].unsqueeze(1), attn_all)
        residual.addcmul_(gate_mlp[rows].unsqueeze(1), ff_all)

    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    normed_context = block.norm2_context(encoder_hidden_states)
    normed_context = normed_context * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context_ff = block.ff_context(normed_context)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def single_block_forward(
    block,
    cache: BlockCache,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    temb: Tensor,
    rope: Rope,
    step: StepIndex | None = None,
    residual: Tensor | None = None,
    rows: slice = ALL_ROWS,
    keep_all=keep,
    output_caches: bool = True,
    kv_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`FluxSingleTransformerBlock.forward` for all text tokens and the computed image tokens:
    one input [text, image] feeds the attention (queries of these tokens over the cached K/V of
    all) and the MLP; one output projection of both. Caches as `double_block_forward` (the
    image rows of that projection's output in `cache.attn`)."""
    if step is not None:
        rows, output_caches = step.rows, residual is not None
    text = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    normed, gate = block.norm(x, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(normed))
    attn = block.attn
    q, k, v = _heads(attn, *_projections(attn, normed, context=False), context=False)
    q, k = _rotated_pair((q,), (k,), rope)
    attn_output = _cached_attention(q, k, v, text, cache, step, kv_rows, keep_all)
    projected = block.proj_out(torch.cat([attn_output, mlp], dim=2))
    gate = gate.unsqueeze(1)
    x = x + gate * projected
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    if output_caches:
        out_all = store(cache, "attn", projected[:, text:], step, rows, keep_all)
        if step is not None and residual is not None:
            residual.addcmul_(gate[rows], out_all)
    return x[:, :text], x[:, text:]
