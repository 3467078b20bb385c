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
from torch import Tensor

from ..caches import gather_tokens, write_rows
from ..hooks import PatchSet
from ..schedule import Geometry, Mode
from ..state import CATState
from .block import cat_block_forward

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


def _randn(shape: tuple[int, ...], generator, device=None, dtype=None) -> Tensor:
    """Standard normal values made on the CPU from `generator` (seeded, device-independent),
    or directly on `device` (e.g. the meta device) without one."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


# ---- installing on a transformer ------------------------------------------------------------
def _call_argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class SD3Adapter:
    """Hooks CAT into one `SD3Transformer2DModel` instance; `remove()` undoes it exactly."""

    check = staticmethod(check_transformer)
    calls_per_step: int | None = 1  # one call per step (CFG batched; SLG calls pass through)
    batched_cfg = True  # CFG as 2B rows of one call

    @staticmethod
    def num_blocks(transformer) -> int:
        return len(transformer.transformer_blocks)

    text_tokens = 333  # CLIP 77 + T5 256: what the SD3 pipelines pass

    @staticmethod
    def example_conditioning(
        config, rows: int, text_tokens: int, device=None, dtype=None, generator=None
    ) -> dict:
        """Random text conditioning of a transformer call (everything but the latents and the
        timestep), for benchmarks and the census."""
        like = dict(device=device, dtype=dtype)
        return dict(
            encoder_hidden_states=_randn(
                (rows, text_tokens, config.joint_attention_dim), generator, **like
            ),
            pooled_projections=_randn((rows, config.pooled_projection_dim), generator, **like),
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
        self.controlnet: list[Tensor] | None = None
        self.timestep: Tensor | None = None  # of the current call, for the token forecast
        self._temb: tuple[Tensor, Tensor] | None = None  # this call's (temb, silu(temb))
        self._warned_outside = False

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
        """`compile=`: regional compilation. One compiled function serves every block (dynamo
        reuses a graph across blocks of the same layout, so compile time does not grow with
        depth), one the blocks' own forward on full steps, one the selection; the embeddings
        and hooks between them run eagerly. Nothing is set on the model: removal is free."""
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
        state, schedule = self.state, self.state.schedule
        if _call_argument(args, kwargs, "skip_layers", 7) is not None:
            schedule.mode = Mode.PASS  # skip-layer guidance: an extra call inside the same step
            return None
        if not schedule.in_run:
            self._warn_outside()
        mode = state.plan_call(self._geometry(args, kwargs), self._step_cost_ratio)
        schedule.mode = mode
        if mode is Mode.PASS or state.tokens is None:
            return None
        if state.persistent and schedule.step == 0 and schedule.prunes():
            state.allocate(self._block_shapes(), self._features())
        self.timestep = _call_argument(args, kwargs, "timestep", 3)
        if mode is not Mode.PRUNED:
            return None
        index = state.begin_pruned_step().index
        controlnet = kwargs.get("block_controlnet_hidden_states")
        self.controlnet = controlnet
        if controlnet is not None:
            kwargs = dict(kwargs)
            kwargs["block_controlnet_hidden_states"] = [gather_tokens(c, index) for c in controlnet]
            return args, kwargs
        return None

    @torch.compiler.disable
    def _post_call(self, module, args, kwargs, output):
        state, schedule = self.state, self.state.schedule
        mode, schedule.mode = schedule.mode, Mode.PASS
        if mode not in (Mode.PASS, Mode.REUSE) and state.steps.skips:
            sample = output[0] if isinstance(output, tuple) else output.sample
            state.steps.observe(sample, schedule.step)
        self.controlnet = self.timestep = self._temb = None
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

    def cost_model(self):
        """The MAC model of this transformer (`stats.ModelDims`)."""
        from ..stats import ModelDims

        return ModelDims.from_config(self.transformer.config)

    def step_macs(
        self, tokens: int, text: int, computed: int | None = None, lean: bool = False
    ) -> int:
        """MACs of one call for one batch row (see `cost_model`)."""
        return self.cost_model().step_macs(tokens, text, computed, lean)

    def _step_cost_ratio(self) -> float:
        geo = self.state.schedule.geometry
        full = self.step_macs(geo.tokens, geo.text_tokens)
        budget, lean = self.state.log.budget, self.state.config.lean
        return self.step_macs(geo.tokens, geo.text_tokens, budget, lean) / full

    def _features(self) -> int:
        config = self.transformer.config
        return config.patch_size**2 * (config.out_channels or config.in_channels)

    def _block_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The cache shapes of each block for this run's geometry (see `BlockCache`)."""
        schedule, lean = self.state.schedule, self.state.config.lean
        geo, dim = schedule.geometry, self.transformer.inner_dim
        image = (geo.rows, geo.tokens, dim)
        joint = (geo.rows, geo.tokens + geo.text_tokens, dim)
        outputs = (schedule.groups, geo.tokens, dim)  # the driver rows only
        shapes = []
        for block in self.transformer.transformer_blocks:
            entry = {"kv": (2, *joint)}
            if not lean:
                entry.update(attn=outputs, ff=outputs)
            if block.use_dual_attention:
                entry.update(key2=image, value2=image)
                if not lean:
                    entry.update(attn2=outputs)
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
        if state.schedule.mode is not Mode.PRUNED:
            return None
        if not state.config.lean:
            # The driver rows' dense residual stream, for this call only; contiguous (the
            # conv leaves (R, D, L) memory order, which every update would read across rows).
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
        encoder_hidden_states=None,
        temb=None,
        joint_attention_kwargs=None,
    ):
        state, caches, schedule = self.state, self.state.caches, self.state.schedule
        if schedule.mode in (Mode.PRUNED, Mode.RECORD):
            pruned = schedule.mode is Mode.PRUNED
            return self._block_fn(
                self.transformer.transformer_blocks[i],
                caches.blocks[i],
                hidden_states,
                encoder_hidden_states,
                temb,
                step=state.step_index if pruned else None,
                residual=caches.residual if pruned else None,
                rows=schedule.driver_slice,
                keep_all=caches.keep,
                output_caches=not state.config.lean,
                temb_act=self._temb_act(temb),
            )
        block = self.transformer.transformer_blocks[i]
        if self._full_fn is not None and getattr(original, "__self__", None) is block:
            original = functools.partial(self._full_fn, block)  # the class forward, compiled
        return original(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            joint_attention_kwargs=joint_attention_kwargs,
        )

    def _temb_act(self, temb: Tensor) -> Tensor:
        """silu(temb), which every block's modulation reads: one kernel per call, not one per
        norm."""
        if self._temb is None or self._temb[0] is not temb:
            self._temb = (temb, torch.nn.functional.silu(temb))
        return self._temb[1]

    def _before_norm_out(self, module, args):
        state = self.state
        if state.schedule.mode is not Mode.PRUNED:
            return None
        dense = state.caches.residual
        if dense is None:
            return None  # lean: the final norm and projection run on the computed tokens only
        hidden, rest = args[0], args[1:]
        rows = state.schedule.driver_slice
        if self.controlnet is not None:
            # The transformer adds ControlNet residuals after every block but the last.
            blocks = self.transformer.transformer_blocks
            interval = len(blocks) / len(self.controlnet)
            for i, block in enumerate(blocks):
                if block.context_pre_only is False:
                    dense.add_(self.controlnet[int(i / interval)][rows])
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
