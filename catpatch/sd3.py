"""The SD3-family model adapter: where CAT plugs into `SD3Transformer2DModel`.

All knowledge of the diffusers layout lives here. The transformer's own `forward` stays in
charge (LoRA scaling, skip layers, ControlNet residuals, unpatchify); CAT changes it at five
points, all on this model instance:

- transformer pre/post hooks: decide the step's mode, count steps, gather ControlNet residuals;
- `pos_embed` output: on a pruned step only the selected tokens enter the blocks;
- each block's `forward`: on the recording step and on pruned steps, our block function;
- `norm_out` input: the dense residual stream of all tokens, with the computed tokens in place;
- `proj_out` output: unselected tokens take their previous output; the next selection is made.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .hooks import PatchSet
from .state import BlockCache, CATState, Geometry, Mode, keep

# Attention processors whose computation our pruned attention reproduces.
KNOWN_PROCESSORS = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0")


def check_transformer(transformer) -> None:
    """Raise `TypeError` if CAT cannot serve this transformer as it is set up now."""
    from diffusers import SD3Transformer2DModel

    if not isinstance(transformer, SD3Transformer2DModel):
        raise TypeError(
            f"expected an SD3Transformer2DModel, got {type(transformer).__name__}; CAT supports "
            f"SD3-family transformers (SD3-medium, SD3.5-medium, SD3.5-large)"
        )
    if getattr(transformer, "image_proj", None) is not None:
        raise TypeError(
            "an IP-Adapter is loaded on this transformer; CAT does not support IP-Adapter yet. "
            "Call pipe.unload_ip_adapter() first"
        )
    for name, proc in transformer.attn_processors.items():
        if type(proc).__name__ not in KNOWN_PROCESSORS:
            raise TypeError(
                f"attention processor {type(proc).__name__} at {name} would be bypassed on "
                f"pruned steps; CAT supports {', '.join(KNOWN_PROCESSORS)}. Restore the default "
                f"with transformer.set_attn_processor(JointAttnProcessor2_0()) first"
            )


# ---- the pruned / recording block ------------------------------------------------------------
def _rows_index(index: Tensor, shape: torch.Size) -> Tensor:
    """Expand (R, S) token indices over the trailing dims of a (R, L, ...) tensor."""
    return index.view(*index.shape, *([1] * (len(shape) - 2))).expand(
        index.shape[0], index.shape[1], *shape[2:]
    )


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[r, index[r]] for every row r. (R, L, ...) -> (R, S, ...)."""
    return x.gather(1, _rows_index(index, x.shape))


def _store(cache: BlockCache, name: str, values: Tensor, index: Tensor | None, keep_all) -> Tensor:
    """Write computed tokens into `cache.name` (all of them at the recording step, else the
    selected ones) and return the full updated (R, L, ...) tensor for this step's use."""
    if index is None:
        setattr(cache, name, keep_all(getattr(cache, name), values))
        return getattr(cache, name)
    buffer = getattr(cache, name)
    where = _rows_index(index, buffer.shape)
    return buffer.scatter_(1, where, values)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1)


def _projections(attn, x: Tensor, context: bool) -> tuple[Tensor, Tensor, Tensor]:
    fused = getattr(attn, "to_added_qkv" if context else "to_qkv", None)
    if getattr(attn, "fused_projections", False) and fused is not None:
        return fused(x).chunk(3, dim=-1)
    if context:
        return attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def attention(
    attn,
    x: Tensor,
    context: Tensor | None,
    cache: BlockCache,
    slot: str,
    index: Tensor | None,
    keep_all=keep,
) -> tuple[Tensor, Tensor | None]:
    """Joint attention for the computed image tokens against all L cached image K/V (+ text).

    Mirrors diffusers' `JointAttnProcessor2_0`; `slot` "" is the joint attention, "2" the
    image-only second attention of dual-attention blocks. With `index` None every token is
    computed and the caches are (re)filled through `keep_all` (see `state.keep`).

    K/V are cached after the qk-norm as (R, L+T, D): image tokens first, then this step's text
    tokens, rewritten in place every step. Attention reads the cache as is, with no
    concatenation (a `torch.cat` of an in-place-updated cache is what inductor in torch 2.13
    miscompiles: it builds the update inside the cat's buffer and writes the cache back from
    it after that buffer was reused).
    """
    heads = attn.heads
    q, k, v = _projections(attn, x, context=False)
    q, k = _normed(attn.norm_q, q, heads), _normed(attn.norm_k, k, heads)
    computed = q.shape[1]
    if context is not None:
        cq, ck, cv = _projections(attn, context, context=True)
        cq, ck = _normed(attn.norm_added_q, cq, heads), _normed(attn.norm_added_k, ck, heads)
        q = torch.cat([q, cq], dim=1)
    if index is None:
        if context is not None:
            k, v = torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)
        for name, value in (("key" + slot, k), ("value" + slot, v)):
            setattr(cache, name, keep_all(getattr(cache, name), value))
    keys, values = getattr(cache, "key" + slot), getattr(cache, "value" + slot)
    if index is not None:
        where = _rows_index(index, keys.shape)
        keys.scatter_(1, where, k)
        values.scatter_(1, where, v)
        if context is not None:
            text = context.shape[1]
            keys[:, -text:].copy_(ck)
            values[:, -text:].copy_(cv)
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


def cat_block_forward(
    block,
    cache: BlockCache,
    index: Tensor | None,
    residual: Tensor | None,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    temb: Tensor,
    keep_all=keep,
) -> tuple[Tensor | None, Tensor]:
    """`JointTransformerBlock.forward` for the computed tokens, reading/writing `cache`.

    `hidden_states` holds the computed tokens only (all L with `index` None). On pruned steps
    the gated cached outputs of all tokens are also added to `residual`, the dense residual
    stream from which the unselected tokens' outputs are estimated. `keep_all` turns a
    recording step's tensors into caches (see `state.keep`).
    """
    if block.use_dual_attention:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp, normed2, gate_msa2 = block.norm1(
            hidden_states, emb=temb
        )
    else:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    if block.context_pre_only:
        normed_context = block.norm1_context(encoder_hidden_states, temb)
    else:
        normed_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            encoder_hidden_states, emb=temb
        )

    attn_output, context_attn_output = attention(
        block.attn, normed, normed_context, cache, "", index, keep_all
    )
    attn_all = _store(cache, "attn", attn_output, index, keep_all)
    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
    if block.use_dual_attention:
        attn_output2, _ = attention(block.attn2, normed2, None, cache, "2", index, keep_all)
        attn2_all = _store(cache, "attn2", attn_output2, index, keep_all)
        hidden_states = hidden_states + gate_msa2.unsqueeze(1) * attn_output2

    normed = block.norm2(hidden_states)
    normed = normed * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ff_output = _feed_forward(block, block.ff, normed)
    ff_all = _store(cache, "ff", ff_output, index, keep_all)
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff_output

    if residual is not None:
        residual.addcmul_(gate_msa.unsqueeze(1), attn_all)
        if block.use_dual_attention:
            residual.addcmul_(gate_msa2.unsqueeze(1), attn2_all)
        residual.addcmul_(gate_mlp.unsqueeze(1), ff_all)

    if block.context_pre_only:
        return None, hidden_states
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    normed_context = block.norm2_context(encoder_hidden_states)
    normed_context = normed_context * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context_ff = _feed_forward(block, block.ff_context, normed_context)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff
    return encoder_hidden_states, hidden_states


# ---- installing on a transformer ------------------------------------------------------------
def _call_argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class SD3Adapter:
    """Hooks CAT into one `SD3Transformer2DModel` instance; `remove()` undoes it exactly."""

    def __init__(self, transformer, state: CATState):
        self.transformer = transformer
        self.state = state
        self.patches = PatchSet()
        self.controlnet: list[Tensor] | None = None
        self._warned_outside = False

    # -- install / remove
    def install(self) -> None:
        t, p = self.transformer, self.patches
        p.add_handle(t.register_forward_pre_hook(self._pre_call, with_kwargs=True))
        p.add_handle(t.register_forward_hook(self._post_call, with_kwargs=True))
        p.add_handle(t.pos_embed.register_forward_hook(self._after_embed))
        p.add_handle(t.norm_out.register_forward_pre_hook(self._before_norm_out))
        p.add_handle(t.proj_out.register_forward_hook(self._after_proj_out))
        if self.state.config.selection == "step":
            forward = functools.partial(self._reusing_forward, t.forward)
            p.set_attribute(t, "forward", functools.update_wrapper(forward, t.forward))
        for i, block in enumerate(t.transformer_blocks):
            forward = functools.partial(self._block_forward, i, block.forward)
            p.set_attribute(block, "forward", functools.update_wrapper(forward, block.forward))
        mode = self.state.config.compile
        if mode is not None:
            # What `Module.compile()` does, recorded so that remove_cat undoes it.
            compiled = torch.compile(
                t._call_impl, mode=None if mode == "default" else mode, dynamic=False
            )
            p.set_attribute(t, "_compiled_call_impl", compiled)

    def remove(self) -> None:
        self.patches.undo()

    # -- transformer call
    def _geometry(self, args: tuple, kwargs: dict) -> Geometry:
        hidden = _call_argument(args, kwargs, "hidden_states", 0)
        context = _call_argument(args, kwargs, "encoder_hidden_states", 1)
        patch = self.transformer.config.patch_size
        return Geometry(
            rows=hidden.shape[0],
            height=hidden.shape[-2] // patch,
            width=hidden.shape[-1] // patch,
            text_tokens=context.shape[1],
            device=hidden.device,
            dtype=hidden.dtype,
        )

    # The step bookkeeping stays out of compiled graphs: it is Python state that changes every
    # step, which a traced graph would have to guard on (one recompile per step).
    @torch.compiler.disable
    def _pre_call(self, module, args, kwargs):
        state = self.state
        if _call_argument(args, kwargs, "skip_layers", 7) is not None:
            state.mode = Mode.PASS  # skip-layer guidance: an extra call inside the same step
            return None
        if not state.in_run:
            self._warn_outside()
        mode = state.plan_call(self._geometry(args, kwargs))
        state.mode = mode
        if mode is Mode.PASS:
            return None
        if state.config.selection == "step":
            if state.step == 0:
                state.plan_reuse(self._step_cost_ratio())
            return None
        if state.persistent and state.step == 0 and state.prunes():
            state.allocate(self._block_shapes(), self._features())
        if mode is not Mode.PRUNED:
            return None
        index = state.begin_pruned_step()
        controlnet = kwargs.get("block_controlnet_hidden_states")
        self.controlnet = controlnet
        if controlnet is not None:
            kwargs = dict(kwargs)
            kwargs["block_controlnet_hidden_states"] = [gather_tokens(c, index) for c in controlnet]
            return args, kwargs
        return None

    @torch.compiler.disable
    def _post_call(self, module, args, kwargs, output):
        state = self.state
        mode, state.mode = state.mode, Mode.PASS
        if mode is Mode.FULL and state.config.selection == "step":
            state.last_sample = output[0] if isinstance(output, tuple) else output.sample
        self.controlnet = None
        state.residual = None
        state.finish_call(mode)
        return None

    def _reusing_forward(self, original, *args, **kwargs):
        """selection="step": on a reuse step, the previous output again, model not run."""
        if self.state.mode is not Mode.REUSE:
            return original(*args, **kwargs)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        sample = self.state.last_sample
        return (
            Transformer2DModelOutput(sample=sample)
            if kwargs.get("return_dict", True)
            else (sample,)
        )

    def _step_cost_ratio(self) -> float:
        from .stats import ModelDims, step_macs

        geo, dims = self.state.geometry, ModelDims.from_config(self.transformer.config)
        full = step_macs(dims, geo.tokens, geo.text_tokens)
        return step_macs(dims, geo.tokens, geo.text_tokens, self.state.log.budget) / full

    def _features(self) -> int:
        config = self.transformer.config
        return config.patch_size**2 * (config.out_channels or config.in_channels)

    def _block_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The cache shapes of each block for this run's geometry (see `BlockCache`)."""
        geo = self.state.geometry
        dim = self.transformer.inner_dim
        image = (geo.rows, geo.tokens, dim)
        joint = (geo.rows, geo.tokens + geo.text_tokens, dim)
        shapes = []
        for block in self.transformer.transformer_blocks:
            entry = {"key": joint, "value": joint, "attn": image, "ff": image}
            if block.use_dual_attention:
                entry.update(key2=image, value2=image, attn2=image)
            shapes.append(entry)
        return shapes

    def _warn_outside(self) -> None:
        if not self._warned_outside:
            self._warned_outside = True
            warnings.warn(
                "catpatch: the transformer was called outside a generation, so CAT ran it "
                "unpruned. Pipelines start a generation themselves; with your own denoising loop, "
                "wrap it in `with catpatch.cat_generation(transformer, num_inference_steps=N):`",
                stacklevel=4,
            )

    # -- inside the call
    def _after_embed(self, module, args, output: Tensor):
        state = self.state
        if state.mode is not Mode.PRUNED:
            return None
        state.residual = output.clone()  # lives for this call only
        return gather_tokens(output, state.index)

    def _block_forward(
        self,
        i: int,
        original,
        hidden_states,
        encoder_hidden_states=None,
        temb=None,
        joint_attention_kwargs=None,
    ):
        state = self.state
        if state.mode in (Mode.PRUNED, Mode.RECORD):
            pruned = state.mode is Mode.PRUNED
            return cat_block_forward(
                self.transformer.transformer_blocks[i],
                state.caches[i],
                state.index if pruned else None,
                state.residual if pruned else None,
                hidden_states,
                encoder_hidden_states,
                temb,
                state.keep,
            )
        return original(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            joint_attention_kwargs=joint_attention_kwargs,
        )

    def _before_norm_out(self, module, args):
        state = self.state
        if state.mode is not Mode.PRUNED:
            return None
        hidden, rest = args[0], args[1:]
        dense = state.residual
        if self.controlnet is not None:
            # The transformer adds ControlNet residuals after every block but the last.
            blocks = self.transformer.transformer_blocks
            interval = len(blocks) / len(self.controlnet)
            for i, block in enumerate(blocks):
                if block.context_pre_only is False:
                    dense.add_(self.controlnet[int(i / interval)])
        dense.scatter_(1, _rows_index(state.index, dense.shape), hidden)
        return (dense, *rest)

    def _after_proj_out(self, module, args, output: Tensor):
        state = self.state
        if state.mode in (Mode.PASS, Mode.FULL):
            return None
        return state.observe_output(state.mode, output)
