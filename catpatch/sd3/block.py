"""The pruned SD3 block: `JointTransformerBlock.forward` for the computed tokens only.

On the recording step every token is computed and the caches are filled; on a pruned step only
the S selected image tokens (plus all text tokens) go through the projections, the attention
queries and the FFNs; attention reads the K/V of all L image tokens from the cache, and the
caches are updated in place. Mirrors diffusers' `JointTransformerBlock` and
`JointAttnProcessor2_0` (qk-norm, SD3.5 dual attention, `context_pre_only`, fused QKV, chunked FFN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..blocks import linear_into, store
from ..caches import ALL_ROWS, BlockCache, StepIndex, keep, write_rows


def _split_heads(x: Tensor, heads: int) -> Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1)


def _projections(attn, x: Tensor, context: bool) -> tuple[Tensor, Tensor, Tensor]:
    fused = getattr(attn, "to_added_qkv" if context else "to_qkv", None)
    if getattr(attn, "fused_projections", False) and fused is not None:
        return fused(x).chunk(3, dim=-1)
    if context:
        return attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def _joint_kv_into_cache(
    attn, x: Tensor, context: Tensor, kv: Tensor, step: StepIndex
) -> tuple[Tensor, Tensor]:
    """Eager pruned step: the queries of the image tokens `x` and text tokens `context`, and
    their K/V written into the cache `kv` (2, R, L+T, D) at `step.kv`; -> (q, text q).

    K/V are computed straight into one (2, R·S + R·T, D) buffer in `step.kv`'s order (K image,
    K text, V image, V text; see `linear_into`), which one `index_copy_` then writes: one
    write instead of four, and no concatenated temporary. A part that cannot be computed in
    place (qk-norm on K, a LoRA layer, fused projections) is computed as usual and written
    apart.
    """
    heads, (rows, computed), text = attn.heads, x.shape[:2], context.shape[1]
    if getattr(attn, "fused_projections", False):
        q, k, v = _projections(attn, x, context=False)
        cq, ck, cv = _projections(attn, context, context=True)
        ready = ((k, ck), (v, cv))
    else:
        q, cq, ready = attn.to_q(x), attn.add_q_proj(context), None
    q, cq = _normed(attn.norm_q, q, heads), _normed(attn.norm_added_q, cq, heads)
    split = rows * computed
    stage = q.new_empty(2, split + rows * text, q.shape[-1])
    parts = step.kv_parts()
    pieces = []  # (value, its rows in kv, computed into `stage`)
    for half, linears, norms in (
        (0, (attn.to_k, attn.add_k_proj), (attn.norm_k, attn.norm_added_k)),
        (1, (attn.to_v, attn.add_v_proj), (None, None)),
    ):
        for part, source in enumerate((x, context)):
            slot = stage[half, :split] if part == 0 else stage[half, split:]
            staged = ready is None and norms[part] is None
            staged = staged and linear_into(linears[part], source, slot)
            if staged:
                value = slot
            else:
                value = ready[half][part] if ready is not None else linears[part](source)
                value = _normed(norms[part], value, heads)
            pieces.append((value, parts[2 * half + part], staged))
    if all(staged for *_, staged in pieces):
        write_rows(kv, step.kv, stage)
        return q, cq
    for half in (0, 1):
        (a, rows_a, in_a), (b, rows_b, in_b) = pieces[2 * half : 2 * half + 2]
        if in_a and in_b:
            write_rows(kv, step.kv.view(2, -1)[half], stage[half])
        else:
            write_rows(kv, rows_a, a)
            write_rows(kv, rows_b, b)
    return q, cq


def _record_kv(buffer: Tensor | None, keys, values, keep_all) -> Tensor:
    """The recording step's joint K/V cache (2, R, L+T, D) from its (image, text) parts: in
    eager code concatenated straight into its two halves (no stacked temporary)."""
    k, ck = keys
    shape = (2, k.shape[0], k.shape[1] + ck.shape[1], k.shape[2])
    if torch.compiler.is_compiling():
        return keep_all(buffer, torch.stack([torch.cat(keys, dim=1), torch.cat(values, dim=1)]))
    reusable = buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (
        shape, k.dtype, k.device
    )  # fmt: skip
    kv = buffer if reusable else k.new_empty(shape)
    torch.cat(keys, dim=1, out=kv[0])
    torch.cat(values, dim=1, out=kv[1])
    return kv if reusable else keep_all(None, kv)


def attention(
    attn,
    x: Tensor,
    context: Tensor | None,
    cache: BlockCache,
    slot: str,
    step: StepIndex | None,
    keep_all=keep,
    text_cached: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Joint attention for the computed image tokens against all L cached image K/V (+ text).

    Mirrors diffusers' `JointAttnProcessor2_0`; `slot` "" is the joint attention, "2" the
    image-only second attention of dual-attention blocks. With `step` None every token is
    computed and the caches are (re)filled through `keep_all` (see `caches.keep`).

    K/V are cached after the qk-norm as (R, L+T, D): image tokens first, then this step's text
    tokens, rewritten in place every step. Attention reads the cache as is, with no
    concatenation (a `torch.cat` of an in-place-updated cache is what inductor in torch 2.13
    miscompiles: it builds the update inside the cat's buffer and writes the cache back from
    it after that buffer was reused).

    `text_cached` (an anchor step of a budgeted run, `step` given, `context` None): the text
    tokens are not computed; the image tokens attend to the text K/V the last computed step
    left in the joint cache, and only their own K/V are written.
    """
    heads = attn.heads
    computed = x.shape[1]
    joint = context is not None
    if text_cached:
        q, k, v = _projections(attn, x, context=False)
        q, k = _normed(attn.norm_q, q, heads), _normed(attn.norm_k, k, heads)
        k_rows, _, v_rows, _ = step.kv_parts()
        write_rows(cache.kv, k_rows, k)
        write_rows(cache.kv, v_rows, v)
        keys, values = cache.kv
    elif joint and step is not None and not torch.compiler.is_compiling():
        q, cq = _joint_kv_into_cache(attn, x, context, cache.kv, step)
        q = torch.cat([q, cq], dim=1)
        keys, values = cache.kv
    else:
        q, k, v = _projections(attn, x, context=False)
        q, k = _normed(attn.norm_q, q, heads), _normed(attn.norm_k, k, heads)
        if joint:
            cq, ck, cv = _projections(attn, context, context=True)
            cq, ck = _normed(attn.norm_added_q, cq, heads), _normed(attn.norm_added_k, ck, heads)
            q = torch.cat([q, cq], dim=1)
        if step is None and joint:
            cache.kv = _record_kv(cache.kv, (k, ck), (v, cv), keep_all)
            keys, values = cache.kv
        elif step is None:
            cache.key2, cache.value2 = keep_all(cache.key2, k), keep_all(cache.value2, v)
            keys, values = cache.key2, cache.value2
        elif joint:  # compiled: one write (a second one makes inductor copy the whole cache)
            stacked = torch.cat([t.reshape(-1, t.shape[-1]) for t in (k, ck, v, cv)])
            write_rows(cache.kv, step.kv, stacked)
            keys, values = cache.kv
        else:  # image-only attention: an (R, L, D) cache each
            write_rows(cache.key2, step.image, k)
            write_rows(cache.value2, step.image, v)
            keys, values = cache.key2, cache.value2
    q, keys, values = (_split_heads(t, heads).transpose(1, 2) for t in (q, keys, values))
    out = F.scaled_dot_product_attention(q, keys, values, dropout_p=0.0)
    out = out.transpose(1, 2).flatten(2).to(q.dtype)
    image, text = out[:, :computed], out[:, computed:]
    image = attn.to_out[1](attn.to_out[0](image))
    if context is None:
        return image, None
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    return image, text


def _normed(norm, x: Tensor, heads: int) -> Tensor:
    """The per-head qk-norm (RMS norm over head_dim) of a (R, N, D) projection, if any."""
    return x if norm is None else norm(_split_heads(x, heads)).flatten(2)


def _feed_forward(block, ff, x: Tensor) -> Tensor:
    """`ff` (the block's image or context FFN), chunked when the block enables it."""
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
    return ff(x)


def _plain(module, *kinds: str) -> bool:
    """Whether `module` is one of diffusers' `kinds` and runs its class's own forward with a
    plain silu (no instance override, no hooks), so that it can be computed here."""
    if type(module).__name__ not in kinds or not isinstance(module.silu, torch.nn.SiLU):
        return False
    return not ("forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks)


def _modulate(norm, x: Tensor, temb: Tensor, temb_act: Tensor) -> tuple[Tensor, ...]:
    """`norm(x, emb=temb)` of diffusers' `AdaLayerNormZero` (5 outputs) or
    `SD35AdaLayerNormZeroX` (7), with `scale_mlp` replaced by 1 + scale_mlp.

    The same float ops in the same order as diffusers, with two kernels fewer per norm:
    silu(temb) (`temb_act`) is computed once for all blocks, and every 1 + scale of the norm
    comes from one `1 + emb` (elementwise, so each value is the same). Any other norm runs
    its own forward.
    """
    kind = type(norm).__name__
    plain = _plain(norm, "AdaLayerNormZero", "SD35AdaLayerNormZeroX")
    if plain and getattr(norm, "emb", None) is None:
        emb = norm.linear(temb_act)
        one_plus = (1 + emb).chunk(emb.shape[1] // x.shape[-1], dim=1)
        parts = emb.chunk(emb.shape[1] // x.shape[-1], dim=1)
        normed = norm.norm(x)
        out = normed * one_plus[1][:, None] + parts[0][:, None]
        if kind == "AdaLayerNormZero":
            return out, parts[2], parts[3], one_plus[4], parts[5]
        normed2 = normed * one_plus[7][:, None] + parts[6][:, None]
        return out, parts[2], parts[3], one_plus[4], parts[5], normed2, parts[8]
    out = norm(x, emb=temb)
    return (*out[:3], 1 + out[3], *out[4:])


def _modulate_continuous(norm, x: Tensor, temb: Tensor, temb_act: Tensor) -> Tensor:
    """`norm(x, temb)` of diffusers' `AdaLayerNormContinuous`, reading silu(temb) `temb_act`."""
    if _plain(norm, "AdaLayerNormContinuous"):
        emb = norm.linear(temb_act.to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return norm.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]
    return norm(x, temb)


def cat_block_forward(
    block,
    cache: BlockCache,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    temb: Tensor,
    step: StepIndex | None = None,
    residual: Tensor | None = None,
    rows: slice = ALL_ROWS,
    keep_all=keep,
    output_caches: bool = True,
    temb_act: Tensor | None = None,
    text_cached: bool = False,
) -> tuple[Tensor | None, Tensor]:
    """`JointTransformerBlock.forward` for the computed tokens, reading/writing `cache`.

    `hidden_states` holds the computed tokens only (all L on the recording step, `step` None).
    On the recording step the K/V caches are filled, and, with `output_caches`, the image
    attention / FFN outputs of the driver rows `rows`. On a pruned step (`step` given) the
    computed tokens' K/V and outputs are written in place, and if the step keeps a dense
    `residual` stream (the driver rows of all L tokens; None when lean), the gated cached
    outputs of every token are added to it: from it the unselected tokens' outputs are
    estimated.
    `keep_all` turns a recording step's tensors into caches (see `caches.keep`); `temb_act`
    is silu(`temb`), which every block's modulation reads (computed here when not given: the
    adapter computes it once per call). `text_cached` (anchor steps): the text stream is not
    computed; attention reads the text K/V of the last computed step, and the text states
    pass through unchanged (no later block reads them: their K/V come from the cache too).
    """
    if step is not None:
        rows, output_caches = step.rows, residual is not None
    if temb_act is None:
        temb_act = F.silu(temb)
    normed, gate_msa, shift_mlp, scale_mlp1, gate_mlp, *dual = _modulate(
        block.norm1, hidden_states, temb, temb_act
    )
    if text_cached:
        normed_context = None
    elif block.context_pre_only:
        normed_context = _modulate_continuous(
            block.norm1_context, encoder_hidden_states, temb, temb_act
        )
    else:
        normed_context, c_gate_msa, c_shift_mlp, c_scale_mlp1, c_gate_mlp = _modulate(
            block.norm1_context, encoder_hidden_states, temb, temb_act
        )

    attn_output, context_attn_output = attention(
        block.attn, normed, normed_context, cache, "", step, keep_all, text_cached
    )
    attn_all = store(cache, "attn", attn_output, step, rows, keep_all) if output_caches else None
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    if block.use_dual_attention:
        normed2, gate_msa2 = dual
        attn_output2, _ = attention(block.attn2, normed2, None, cache, "2", step, keep_all)
        attn2_all = (
            store(cache, "attn2", attn_output2, step, rows, keep_all) if output_caches else None
        )
        hidden_states = hidden_states + gate_msa2.unsqueeze(1) * attn_output2

    normed = block.norm2(hidden_states)
    normed = normed * scale_mlp1[:, None] + shift_mlp[:, None]
    ff_output = _feed_forward(block, block.ff, normed)
    ff_all = store(cache, "ff", ff_output, step, rows, keep_all) if output_caches else None
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output

    if step is not None and residual is not None:
        residual.addcmul_(gate_msa[rows].unsqueeze(1), attn_all)
        if block.use_dual_attention:
            residual.addcmul_(gate_msa2[rows].unsqueeze(1), attn2_all)
        residual.addcmul_(gate_mlp[rows].unsqueeze(1), ff_all)

    if block.context_pre_only:
        return None, hidden_states
    if text_cached:
        return encoder_hidden_states, hidden_states
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    normed_context = block.norm2_context(encoder_hidden_states)
    normed_context = normed_context * c_scale_mlp1[:, None] + c_shift_mlp[:, None]
    context_ff = _feed_forward(block, block.ff_context, normed_context)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff
    return encoder_hidden_states, hidden_states
