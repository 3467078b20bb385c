"""The FLUX.1 model adapter: where CAT plugs into `FluxTransformer2DModel`.

All knowledge of diffusers' FLUX layout lives here. The transformer's own `forward` stays in
charge (LoRA scaling, guidance and text embeddings, ControlNet residuals); CAT changes it at
six points, all on this model instance:

- transformer pre/post hooks: decide the call's mode, count steps, gather ControlNet residuals;
- `x_embedder` output: on a pruned step only the selected image tokens enter the blocks;
- `pos_embed` output: on a pruned step the rotary rows of [all text, selected image] tokens;
- each double- and single-stream block's `forward`: on the recording step and on pruned steps,
  our block functions (`block.py`);
- `norm_out` input: the dense residual stream of all tokens, with the computed tokens in place;
- `proj_out` output: unselected tokens take their previous output; the next selection is made.

FLUX pipelines with true CFG (`true_cfg_scale` > 1 and a negative prompt) call the
transformer twice per step, conditional then unconditional, each with the B rows of one
image set. A step therefore ends when the pipeline's progress bar advances
(`calls_per_step = None`): the second call follows the first (its mode and selection, caches of
its own). Guidance-distilled FLUX.1-dev/schnell make one call per step and select per sample.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

from ..caches import gather_positions, gather_tokens, write_rows
from ..hooks import PatchSet
from ..schedule import Geometry, Mode
from ..state import CATState
from .block import double_block_forward, joint_kv_rows, single_block_forward
from .cost import FluxDims, step_macs
from .inputs import call_inputs

# Attention processors whose computation our pruned attention reproduces.
KNOWN_PROCESSORS = ("FluxAttnProcessor",)
_CONTROLNET = ("controlnet_block_samples", "controlnet_single_block_samples")


def check_transformer(transformer) -> None:
    """Raise `TypeError` if CAT cannot serve this FLUX transformer as it is set up now."""
    from diffusers import FluxTransformer2DModel

    if not isinstance(transformer, FluxTransformer2DModel):
        raise TypeError(
            f"expected a FluxTransformer2DModel, got {type(transformer).__name__}; CAT supports "
            f"FLUX.1 transformers (dev, schnell)"
        )
    if getattr(transformer, "encoder_hid_proj", None) is not None:
        raise TypeError(
            "an IP-Adapter is loaded on this transformer; CAT does not support IP-Adapter yet. "
            "Call pipe.unload_ip_adapter() first"
        )
    for name, proc in transformer.attn_processors.items():
        if type(proc).__name__ not in KNOWN_PROCESSORS:
            raise TypeError(
                f"attention processor {type(proc).__name__} at {name} would be bypassed on "
                f"pruned steps; CAT supports {', '.join(KNOWN_PROCESSORS)}. Restore the default "
                f"with transformer.set_attn_processor(FluxAttnProcessor()) first"
            )
        if getattr(proc, "_parallel_config", None) is not None:
            raise TypeError(
                f"{name} runs context-parallel attention, which pruned steps do not shard; "
                f"disable context parallelism before apply_cat"
            )


def _call_argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class FluxAdapter:
    """Hooks CAT into one `FluxTransformer2DModel` instance; `remove()` undoes it exactly."""

    check = staticmethod(check_transformer)
    calls_per_step: int | None = None  # true CFG: two calls per step, the bar ends a step
    batched_cfg = False  # B rows per call; true CFG is a second call, not 2B rows

    @staticmethod
    def num_blocks(transformer) -> int:
        """Caches: one per double-stream block, then one per single-stream block."""
        return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)

    text_tokens = 512  # T5 max_sequence_length of the FLUX.1 pipelines

    @staticmethod
    def example_conditioning(
        config, rows: int, text_tokens: int, device=None, dtype=None, generator=None
    ) -> dict:
        """Random text conditioning of a transformer call (no latents, image ids or timestep:
        those depend on the size, see `catpatch.flux.inputs.call_inputs`)."""
        inputs = call_inputs(config, rows, 16, 16, text_tokens, device, dtype, generator)
        return {k: v for k, v in inputs.items() if k not in ("hidden_states", "img_ids")}

    @staticmethod
    def example_inputs(
        config, rows: int, height: int, width: int, text_tokens: int, device=None,
        dtype=None, generator=None,
    ) -> dict:  # fmt: skip
        """Random keyword arguments of one transformer call at `height` x `width` pixels:
        packed latents, position ids, conditioning and a mid-schedule sigma as the timestep."""
        inputs = call_inputs(config, rows, height, width, text_tokens, device, dtype, generator)
        inputs["timestep"] = torch.full((rows,), 0.5, device=device)
        return inputs

    def __init__(self, transformer, state: CATState):
        self.transformer = transformer
        self.state = state
        self.patches = PatchSet()
        self.dims = FluxDims.from_config(transformer.config)
        self.controlnet: tuple | None = None  # this call's (double, single, repeat) residuals
        self.timestep: Tensor | None = None
        self._kv_rows: Tensor | None = None  # this pruned step's K/V cache rows, FLUX order
        self._grid: tuple[int, int, int] | None = None  # (L, H', W') of the last run
        self._warned_outside = False

    # -- install / remove
    def install(self) -> None:
        t, p = self.transformer, self.patches
        p.add_handle(t.register_forward_pre_hook(self._pre_call, with_kwargs=True))
        p.add_handle(t.register_forward_hook(self._post_call, with_kwargs=True))
        p.add_handle(t.x_embedder.register_forward_hook(self._after_embed))
        p.add_handle(t.pos_embed.register_forward_hook(self._after_rope))
        p.add_handle(t.norm_out.register_forward_pre_hook(self._before_norm_out))
        p.add_handle(t.proj_out.register_forward_hook(self._after_proj_out))
        if self.state.steps.skips:
            forward = functools.partial(self._reusing_forward, t.forward)
            p.set_attribute(t, "forward", functools.update_wrapper(forward, t.forward))
        blocks = [(b, False) for b in t.transformer_blocks]
        blocks += [(b, True) for b in t.single_transformer_blocks]
        for i, (block, single) in enumerate(blocks):
            forward = functools.partial(self._block_forward, i, single, block.forward)
            p.set_attribute(block, "forward", functools.update_wrapper(forward, block.forward))
        self._compile_regions()

    def _compile_regions(self) -> None:
        """`compile=`: regional compilation, one compiled function per block kind and phase
        function (dynamo reuses a graph across blocks of the same layout) and one for the
        selection; nothing is set on the model."""
        self._double, self._single = double_block_forward, single_block_forward
        self._observe = self.state.observe_output
        self._full: dict[bool, object] = {}
        mode = self.state.config.compile
        if mode is None:
            return
        compile_ = functools.partial(
            torch.compile, mode=None if mode == "default" else mode, dynamic=False
        )
        self._double, self._single = compile_(double_block_forward), compile_(single_block_forward)
        self._observe = compile_(self.state.observe_output)
        t = self.transformer
        self._full = {
            False: compile_(type(t.transformer_blocks[0]).forward),
            True: compile_(type(t.single_transformer_blocks[0]).forward),
        }

    def remove(self) -> None:
        self.patches.undo()

    # -- cost
    def cost_model(self) -> FluxDims:
        """The MAC model of this transformer (`flux.cost.FluxDims`, a `stats.CostModel`)."""
        return self.dims

    def step_macs(
        self, tokens: int, text: int, computed: int | None = None, lean: bool = False
    ) -> int:
        """MACs of one call per batch row (see `catpatch.flux.cost`)."""
        return step_macs(self.dims, tokens, text, computed, lean)

    def _step_cost_ratio(self) -> float:
        geo = self.state.schedule.geometry
        full = self.step_macs(geo.tokens, geo.text_tokens)
        budget, lean = self.state.log.budget, self.state.config.lean
        return self.step_macs(geo.tokens, geo.text_tokens, budget, lean) / full

    # -- transformer call
    def _token_grid(self, img_ids: Tensor | None, tokens: int) -> tuple[int, int]:
        """(H', W') of the packed image tokens, read from `img_ids` (raster order: the last
        token holds the largest row and column) once per run: a host read, at a run's first
        call only. Not a raster grid, or ids on the meta device: a square when L is one."""
        schedule = self.state.schedule
        first = schedule.step == 0 and not schedule.follower
        if self._grid is not None and self._grid[0] == tokens and not first:
            return self._grid[1:]
        side = math.isqrt(tokens)
        height, width = (side, side) if side * side == tokens else (1, tokens)
        if img_ids is not None and img_ids.device.type != "meta":
            last = img_ids.reshape(-1, img_ids.shape[-1])[-1, 1:].tolist()
            rows, cols = int(last[0]) + 1, int(last[1]) + 1
            if rows * cols == tokens:
                height, width = rows, cols
        self._grid = (tokens, height, width)
        return height, width

    def _geometry(self, args: tuple, kwargs: dict) -> Geometry:
        hidden = _call_argument(args, kwargs, "hidden_states", 0)
        context = _call_argument(args, kwargs, "encoder_hidden_states", 1)
        height, width = self._token_grid(
            _call_argument(args, kwargs, "img_ids", 4), hidden.shape[1]
        )
        return Geometry(
            rows=hidden.shape[0],
            height=height,
            width=width,
            text_tokens=context.shape[1],
            device=hidden.device,
            dtype=hidden.dtype,
        )

    # The step bookkeeping stays out of compiled graphs: it is Python state that changes every
    # step, which a traced graph would have to guard on (one recompile per step).
    @torch.compiler.disable
    def _pre_call(self, module, args, kwargs):
        state, schedule = self.state, self.state.schedule
        if not schedule.in_run:
            self._warn_outside()
        elif schedule.cfg_rows is None:  # FLUX pipelines: B rows per call, true CFG as calls
            schedule.cfg_rows = False
        mode = state.plan_call(self._geometry(args, kwargs), self._step_cost_ratio)
        schedule.mode = mode
        if mode is Mode.PASS or state.tokens is None:
            return None
        if state.persistent and schedule.step == 0 and schedule.prunes():
            state.allocate(self._block_shapes(), self.transformer.proj_out.out_features)
        self.timestep = _call_argument(args, kwargs, "timestep", 3)
        if mode is not Mode.PRUNED:
            return None
        if not schedule.follower:  # a follower computes the first call's tokens
            step = state.begin_pruned_step()
            self._kv_rows = joint_kv_rows(step, step.index.shape[0])
        step = state.step_index
        samples = [kwargs.get(name) for name in _CONTROLNET]
        if all(s is None for s in samples):
            return None
        self.controlnet = (*samples, bool(kwargs.get("controlnet_blocks_repeat", False)))
        kwargs = dict(kwargs)
        for name, group in zip(_CONTROLNET, samples, strict=True):
            if group is not None:
                kwargs[name] = [gather_tokens(c, step.index) for c in group]
        return args, kwargs

    @torch.compiler.disable
    def _post_call(self, module, args, kwargs, output):
        state, schedule = self.state, self.state.schedule
        mode, schedule.mode = schedule.mode, Mode.PASS
        if mode not in (Mode.PASS, Mode.REUSE) and state.steps.skips:
            sample = output[0] if isinstance(output, tuple) else output.sample
            state.steps.observe(sample, schedule.step)
        self.controlnet = self.timestep = None
        state.caches.residual = None
        state.finish_call(mode)
        return None

    def _reusing_forward(self, original, *args, **kwargs):
        """A step the step policy skips: its output without running the model."""
        if self.state.schedule.mode is not Mode.REUSE:
            return original(*args, **kwargs)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        sample = self.state.steps.output(self.state.schedule.step)
        if kwargs.get("return_dict", True):
            return Transformer2DModelOutput(sample=sample)
        return (sample,)

    def _block_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The cache shapes of each block for this run's geometry (see `BlockCache`)."""
        schedule, dense = self.state.schedule, self.state.dense
        geo, dim = schedule.geometry, self.transformer.inner_dim
        joint = (2, geo.rows, geo.tokens + geo.text_tokens, dim)
        outputs = (schedule.groups, geo.tokens, dim)  # the driver rows only
        double = {"kv": joint, **({"attn": outputs, "ff": outputs} if dense else {})}
        single = {"kv": joint, **({"attn": outputs} if dense else {})}
        t = self.transformer
        return [double] * len(t.transformer_blocks) + [single] * len(t.single_transformer_blocks)

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
        if state.dense:
            state.caches.residual = state.schedule.driver_rows(output).clone(
                memory_format=torch.contiguous_format
            )
        return gather_tokens(output, state.index)

    def _after_rope(self, module, args, output):
        """Pruned step: the rotary rows of [all text, each row's selected image tokens]."""
        state = self.state
        if state.schedule.mode is not Mode.PRUNED:
            return None
        text, index = state.schedule.geometry.text_tokens, state.index
        positions = index + text  # image rows of the (T+L, d) table

        def rows(table: Tensor) -> Tensor:
            head = table[:text].expand(index.shape[0], text, table.shape[-1])
            return torch.cat([head, gather_positions(table, positions)], dim=1)

        return tuple(rows(t) for t in output)

    def _block_forward(
        self,
        i: int,
        single: bool,
        original,
        hidden_states,
        encoder_hidden_states=None,
        temb=None,
        image_rotary_emb=None,
        joint_attention_kwargs=None,
    ):
        state, caches, schedule = self.state, self.state.caches, self.state.schedule
        t = self.transformer
        block = t.single_transformer_blocks[i - len(t.transformer_blocks)] if single else (
            t.transformer_blocks[i]
        )  # fmt: skip
        if schedule.mode in (Mode.PRUNED, Mode.RECORD):
            pruned = schedule.mode is Mode.PRUNED
            return (self._single if single else self._double)(
                block,
                caches.blocks[i],
                hidden_states,
                encoder_hidden_states,
                temb,
                image_rotary_emb,
                step=state.step_index if pruned else None,
                residual=caches.residual if pruned else None,
                rows=schedule.driver_slice,
                keep_all=caches.keep,
                output_caches=state.dense,
                kv_rows=self._kv_rows if pruned else None,
            )
        if single in self._full and getattr(original, "__self__", None) is block:
            original = functools.partial(self._full[single], block)  # the class forward
        return original(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            image_rotary_emb=image_rotary_emb,
            joint_attention_kwargs=joint_attention_kwargs,
        )

    def _before_norm_out(self, module, args):
        state = self.state
        if state.schedule.mode is not Mode.PRUNED:
            return None
        dense = state.caches.residual
        if dense is None:
            return None  # lean: the final norm and projection run on the computed tokens only
        hidden, rest = args[0], args[1:]
        if self.controlnet is not None:
            self._add_controlnet(dense)
        if dense.shape[0] != hidden.shape[0]:
            # Shared CFG pair in one call: the conditional rows' stream stands in for both.
            dense = torch.cat([dense, dense])
        write_rows(dense, state.step_index.image, hidden)
        return (dense, *rest)

    def _add_controlnet(self, dense: Tensor) -> None:
        """The ControlNet residuals the transformer adds after its blocks, to the dense stream
        (the driver rows), as `FluxTransformer2DModel.forward` picks them."""
        rows = self.state.schedule.driver_slice
        double, single, repeat = self.controlnet
        t = self.transformer
        for samples, count, repeats in (
            (double, len(t.transformer_blocks), repeat),
            (single, len(t.single_transformer_blocks), False),
        ):
            if not samples:
                continue
            interval = int(math.ceil(count / len(samples)))
            for i in range(count):
                sample = samples[i % len(samples)] if repeats else samples[i // interval]
                dense.add_(sample[rows])

    def _after_proj_out(self, module, args, output: Tensor):
        state = self.state
        if state.schedule.mode in (Mode.PASS, Mode.FULL):
            return None
        # a follower call only writes its computed rows: eager, so that the compiled
        # selection keeps one graph per phase
        observe = state.observe_output if state.schedule.follower else self._observe
        return observe(state.schedule.mode, output, self.timestep)
