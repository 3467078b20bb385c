"""The PixArt-Σ model adapter: where CAT plugs into `PixArtTransformer2DModel`.

All knowledge of the diffusers layout lives here. The transformer's own `forward` stays in
charge (adaLN-single, caption projection, masks, the final modulation and unpatchify); CAT
changes it at five points, all on this model instance:

- transformer pre/post hooks: decide the step's mode (and, for a pipeline that does not say,
  whether the batch is a CFG pair), count steps;
- `pos_embed` output: on a pruned step only the selected tokens enter the blocks;
- each block's `forward`: on the recording step and on pruned steps, our block function;
- `norm_out` input: the dense residual stream of all tokens, with the computed tokens in place
  (lean runs keep none: the final norm and projection run on the computed tokens only);
- `proj_out` output: unselected tokens take their previous output; the next selection is made.

Model output per token, for the selection's drift: PixArt-Σ predicts noise and (learned sigma)
a variance interpolation, 2·C channels per latent pixel; the pipeline keeps the noise half
only. The drift and the clustering read the noise channels alone (the p·p·C values per token
that reach the sampler), while the replacement of unselected tokens' outputs covers all 2·C.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from ..caches import gather_tokens, write_rows
from ..hooks import PatchSet
from ..schedule import Geometry, Mode
from ..sd3.adapter import _randn
from ..state import CATState
from .block import cat_block_forward
from .cost import PixArtDims

# Attention processors whose computation our pruned self-attention reproduces.
KNOWN_PROCESSORS = ("AttnProcessor2_0", "FusedAttnProcessor2_0")


def check_transformer(transformer) -> None:
    """Raise `TypeError` if CAT cannot serve this transformer as it is set up now."""
    from diffusers import PixArtTransformer2DModel
    from diffusers.models.attention import BasicTransformerBlock

    if not isinstance(transformer, PixArtTransformer2DModel):
        raise TypeError(f"expected a PixArtTransformer2DModel, got {type(transformer).__name__}")
    for i, block in enumerate(transformer.transformer_blocks):
        layout = (
            type(block) is BasicTransformerBlock
            and block.norm_type == "ada_norm_single"
            and block.attn2 is not None
            and not block.only_cross_attention
            and block.pos_embed is None
            and not hasattr(block, "fuser")
        )
        if not layout:
            raise TypeError(
                f"transformer_blocks.{i} is not a PixArt block (BasicTransformerBlock with "
                f"ada_norm_single, self- then cross-attention); CAT supports the PixArt-Σ layout"
            )
    for name, proc in transformer.attn_processors.items():
        if type(proc).__name__ not in KNOWN_PROCESSORS:
            raise TypeError(
                f"attention processor {type(proc).__name__} at {name} would be bypassed on "
                f"pruned steps; CAT supports {', '.join(KNOWN_PROCESSORS)}. Restore the default "
                f"with transformer.set_attn_processor(AttnProcessor2_0()) first"
            )


def _call_argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _is_cfg_pair(hidden: Tensor) -> bool:
    """Whether a batch is a classifier-free-guidance pair: diffusers stacks the same latents
    twice, [uncond..., cond...]. Reads values on the host: once per run, at its first call."""
    rows = hidden.shape[0]
    return rows % 2 == 0 and torch.equal(hidden[: rows // 2], hidden[rows // 2 :])


class PixArtAdapter:
    """Hooks CAT into one `PixArtTransformer2DModel` instance; `remove()` undoes it exactly."""

    check = staticmethod(check_transformer)

    @staticmethod
    def num_blocks(transformer) -> int:
        return len(transformer.transformer_blocks)

    calls_per_step: int | None = 1  # one call per step (CFG batched inside the call)
    batched_cfg = True  # CFG as 2B rows of one call
    text_tokens = 300  # the PixArt-Σ pipeline's max_sequence_length (T5)

    @staticmethod
    def example_conditioning(
        config, rows: int, text_tokens: int, device=None, dtype=None, generator=None
    ) -> dict:
        """Random text conditioning of a transformer call (everything but the latents and the
        timestep), for benchmarks and the census."""
        shape = (rows, text_tokens, config.caption_channels)
        return dict(
            encoder_hidden_states=_randn(shape, generator, device=device, dtype=dtype),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )

    @classmethod
    def example_inputs(
        cls, config, rows: int, height: int, width: int, text_tokens: int, device=None,
        dtype=None, generator=None,
    ) -> dict:  # fmt: skip
        """Random keyword arguments of one transformer call at `height` x `width` pixels
        (latents of an 8x VAE, a mid-schedule timestep and `example_conditioning`)."""
        latents = (rows, config.in_channels, height // 8, width // 8)
        return dict(
            hidden_states=_randn(latents, generator, device=device, dtype=dtype),
            timestep=torch.full((rows,), 500.0, device=device),
            **cls.example_conditioning(config, rows, text_tokens, device, dtype, generator),
        )

    def __init__(self, transformer, state: CATState):
        self.transformer = transformer
        self.state = state
        self.patches = PatchSet()
        self.timestep: Tensor | None = None  # of the current call, for the token forecast
        self._warned_outside = False
        config = transformer.config
        if config.out_channels == 2 * config.in_channels:  # learned sigma
            state.drift_view = functools.partial(
                _noise_channels, patch=config.patch_size, channels=config.in_channels
            )

    # -- install / remove
    def install(self) -> None:
        t, p = self.transformer, self.patches
        p.add_handle(t.register_forward_pre_hook(self._pre_call, with_kwargs=True))
        p.add_handle(t.register_forward_hook(self._post_call, with_kwargs=True))
        p.add_handle(t.pos_embed.register_forward_hook(self._after_embed))
        p.add_handle(t.norm_out.register_forward_pre_hook(self._before_norm_out))
        p.add_handle(t.proj_out.register_forward_hook(self._after_proj_out))
        if self.state.steps.skips:
            forward = functools.partial(self._reusing_forward, t.forward)
            p.set_attribute(t, "forward", functools.update_wrapper(forward, t.forward))
        for i, block in enumerate(t.transformer_blocks):
            forward = functools.partial(self._block_forward, i, block.forward)
            p.set_attribute(block, "forward", functools.update_wrapper(forward, block.forward))
        self._compile_regions()

    def _compile_regions(self) -> None:
        """`compile=`: regional compilation, as for SD3 (see `sd3.adapter`): one compiled
        function serves every pruned/recording block, one the blocks' own forward on full
        steps, one the selection. Nothing is set on the model."""
        self._block_fn, self._observe = cat_block_forward, self.state.observe_output
        self._full_fn = None
        mode = self.state.config.compile
        if mode is None:
            return
        compile_ = functools.partial(
            torch.compile, mode=None if mode == "default" else mode, dynamic=False
        )
        self._block_fn = compile_(cat_block_forward)
        self._observe = compile_(self.state.observe_output)
        self._full_fn = compile_(type(self.transformer.transformer_blocks[0]).forward)

    def remove(self) -> None:
        self.patches.undo()
        self.state.drift_view = None

    def cost_model(self) -> PixArtDims:
        return PixArtDims.from_config(self.transformer.config)

    # -- transformer call
    def _geometry(self, args: tuple, kwargs: dict) -> Geometry:
        hidden = _call_argument(args, kwargs, "hidden_states", 0)
        context = _call_argument(args, kwargs, "encoder_hidden_states", 1)
        patch = self.transformer.config.patch_size
        return Geometry(
            rows=hidden.shape[0],
            height=hidden.shape[-2] // patch,
            width=hidden.shape[-1] // patch,
            text_tokens=0 if context is None else context.shape[1],
            device=hidden.device,
            dtype=hidden.dtype,
            joint_text=False,  # cross-attention: the K/V cache holds image tokens only
        )

    # The step bookkeeping stays out of compiled graphs (see `sd3.adapter`).
    @torch.compiler.disable
    def _pre_call(self, module, args, kwargs):
        state, schedule = self.state, self.state.schedule
        if not schedule.in_run:
            self._warn_outside()
        elif schedule.step == 0:
            # processors set after apply_cat (attention slicing, ...) would be bypassed on
            # pruned steps: refuse them at the run's first call, before anything is pruned
            check_transformer(self.transformer)
            if schedule.cfg_rows is None:
                hidden = _call_argument(args, kwargs, "hidden_states", 0)
                schedule.cfg_rows = _is_cfg_pair(hidden)
        mode = state.plan_call(self._geometry(args, kwargs), self._step_cost_ratio)
        schedule.mode = mode
        if mode is Mode.PASS or state.tokens is None:
            return None
        if state.persistent and schedule.step == 0 and schedule.prunes():
            state.allocate(self._block_shapes(), self._features())
        self.timestep = _call_argument(args, kwargs, "timestep", 2)
        if mode is Mode.PRUNED:
            state.begin_pruned_step()
        return None

    @torch.compiler.disable
    def _post_call(self, module, args, kwargs, output):
        state, schedule = self.state, self.state.schedule
        mode, schedule.mode = schedule.mode, Mode.PASS
        if mode not in (Mode.PASS, Mode.REUSE) and state.steps.skips:
            sample = output[0] if isinstance(output, tuple) else output.sample
            state.steps.observe(sample, schedule.step)
        self.timestep = None
        state.caches.residual = None
        state.finish_call(mode)
        return None

    def _reusing_forward(self, original, *args, **kwargs):
        """A step the step policy skips: its output without running the model."""
        if self.state.schedule.mode is not Mode.REUSE:
            return original(*args, **kwargs)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        sample = self.state.steps.output(self.state.schedule.step)
        return (
            Transformer2DModelOutput(sample=sample)
            if kwargs.get("return_dict", True)
            else (sample,)
        )

    def step_macs(
        self, tokens: int, text: int, computed: int | None = None, lean: bool = False
    ) -> int:
        """MACs of one call for one batch row (see `cost_model`)."""
        return self.cost_model().step_macs(tokens, text, computed, lean)

    def _step_cost_ratio(self) -> float:
        geo, dims = self.state.schedule.geometry, self.cost_model()
        full = dims.step_macs(geo.tokens, geo.text_tokens)
        budget, lean = self.state.log.budget, self.state.config.lean
        return dims.step_macs(geo.tokens, geo.text_tokens, budget, lean) / full

    def _features(self) -> int:
        config = self.transformer.config
        return config.patch_size**2 * (config.out_channels or config.in_channels)

    def _block_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The cache shapes of each block for this run's geometry (see `BlockCache`)."""
        schedule, lean = self.state.schedule, self.state.config.lean
        geo, dim = schedule.geometry, self.transformer.inner_dim
        entry = {"kv": (2, geo.rows, geo.tokens, dim)}
        if not lean:
            outputs = (schedule.groups, geo.tokens, dim)  # the driver rows only
            entry.update(attn=outputs, attn2=outputs, ff=outputs)
        return [dict(entry) for _ in self.transformer.transformer_blocks]

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
        if state.schedule.mode is not Mode.PRUNED:
            return None
        if not state.config.lean:
            # the driver rows' dense residual stream, contiguous (the conv leaves (R, D, L)
            # memory order, which every update would read across rows)
            residual = state.schedule.driver_rows(output).clone(
                memory_format=torch.contiguous_format
            )
            state.caches.residual = residual
        return gather_tokens(output, state.index)

    def _block_forward(
        self,
        i: int,
        original,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        timestep=None,
        cross_attention_kwargs=None,
        class_labels=None,
        added_cond_kwargs=None,
    ):
        state, caches, schedule = self.state, self.state.caches, self.state.schedule
        block = self.transformer.transformer_blocks[i]
        if schedule.mode in (Mode.PRUNED, Mode.RECORD):
            pruned = schedule.mode is Mode.PRUNED
            return self._block_fn(
                block,
                caches.blocks[i],
                hidden_states,
                encoder_hidden_states,
                timestep,
                encoder_attention_mask,
                attention_mask,
                step=state.step_index if pruned else None,
                residual=caches.residual if pruned else None,
                rows=schedule.driver_slice,
                keep_all=caches.keep,
                output_caches=not state.config.lean,
            )
        if self._full_fn is not None and getattr(original, "__self__", None) is block:
            original = functools.partial(self._full_fn, block)  # the class forward, compiled
        return original(
            hidden_states,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            cross_attention_kwargs=cross_attention_kwargs,
            class_labels=class_labels,
            added_cond_kwargs=added_cond_kwargs,
        )

    def _before_norm_out(self, module, args):
        state = self.state
        if state.schedule.mode is not Mode.PRUNED:
            return None
        dense = state.caches.residual
        if dense is None:
            return None  # lean: the final norm and projection run on the computed tokens only
        hidden, rest = args[0], args[1:]
        if dense.shape[0] != hidden.shape[0]:
            # Shared CFG: the unconditional rows' unselected tokens are replaced by their
            # previous output anyway, so the conditional rows' stream stands in for theirs.
            dense = torch.cat([dense, dense])
        write_rows(dense, state.step_index.image, hidden)
        return (dense, *rest)

    def _after_proj_out(self, module, args, output: Tensor):
        state = self.state
        if state.schedule.mode in (Mode.PASS, Mode.FULL):
            return None
        return self._observe(state.schedule.mode, output, self.timestep)


def _noise_channels(output: Tensor, patch: int, channels: int) -> Tensor:
    """The noise prediction of a learned-sigma output (R, L, p·p·2C): per latent pixel the
    first C of its 2·C channels (diffusers' unpatchify order) -> (R, L, p·p·C)."""
    rows, tokens = output.shape[:2]
    return output.view(rows, tokens, patch * patch, 2 * channels)[..., :channels].reshape(
        rows, tokens, patch * patch * channels
    )
