"""The FLUX.1 model adapter: where CAT plugs into `FluxTransformer2DModel`.

All knowledge of diffusers' FLUX layout lives here (the hooks every family shares are in
`catpatch.adapter`). The transformer's own `forward` stays in
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

import math

import torch
from torch import Tensor

from ..adapter import (
    ModelAdapter,
    call_argument,
    check_processors,
    compiler,
    refuse_ip_adapter,
)
from ..caches import gather_positions, gather_tokens
from ..schedule import Geometry, Mode
from ..state import CATState
from .block import double_block_forward, joint_kv_rows, single_block_forward
from .cost import FluxDims
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
    refuse_ip_adapter(transformer, "encoder_hid_proj")
    check_processors(transformer, KNOWN_PROCESSORS, "FluxAttnProcessor")
    for name, proc in transformer.attn_processors.items():
        if getattr(proc, "_parallel_config", None) is not None:
            raise TypeError(
                f"{name} runs context-parallel attention, which pruned steps do not shard; "
                f"disable context parallelism before apply_cat"
            )


class FluxAdapter(ModelAdapter):
    """Hooks CAT into one `FluxTransformer2DModel` instance; `remove()` undoes it exactly."""

    check = staticmethod(check_transformer)
    calls_per_step: int | None = None  # true CFG: two calls per step, the bar ends a step
    batched_cfg = False  # B rows per call; true CFG is a second call, not 2B rows
    lean_followers = True

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
        super().__init__(transformer, state)
        self.dims = FluxDims.from_config(transformer.config)
        self.controlnet: tuple | None = None  # this call's (double, single, repeat) residuals
        self._kv_rows: Tensor | None = None  # this pruned step's K/V cache rows, FLUX order
        self._grid: tuple[int, int, int] | None = None  # (L, H', W') of the last run

    # -- install
    def _embed_hooks(self) -> list:
        t = self.transformer
        return [(t.x_embedder, self._after_embed), (t.pos_embed, self._after_rope)]

    def _blocks(self) -> list:
        """The double-stream blocks, then the single-stream ones."""
        t = self.transformer
        return [*t.transformer_blocks, *t.single_transformer_blocks]

    def _compile_regions(self) -> None:
        """`compile=`: regional compilation, one compiled function per block kind and phase
        function (dynamo reuses a graph across blocks of the same layout) and one for the
        selection; nothing is set on the model."""
        self._double, self._single = double_block_forward, single_block_forward
        self._observe = self.state.observe_output
        self._full: dict[bool, object] = {}
        compile_ = compiler(self.state.config.compile)
        if compile_ is None:
            return
        self._double, self._single = compile_(double_block_forward), compile_(single_block_forward)
        self._observe = compile_(self.state.observe_output)
        t = self.transformer
        self._full = {
            False: compile_(type(t.transformer_blocks[0]).forward),
            True: compile_(type(t.single_transformer_blocks[0]).forward),
        }

    # -- cost
    def cost_model(self) -> FluxDims:
        """The MAC model of this transformer (`flux.cost.FluxDims`, a `stats.CostModel`)."""
        return self.dims

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
        hidden = call_argument(args, kwargs, "hidden_states", 0)
        context = call_argument(args, kwargs, "encoder_hidden_states", 1)
        height, width = self._token_grid(call_argument(args, kwargs, "img_ids", 4), hidden.shape[1])
        return Geometry(
            rows=hidden.shape[0],
            height=height,
            width=width,
            text_tokens=context.shape[1],
            device=hidden.device,
            dtype=hidden.dtype,
        )

    def _features(self) -> int:
        return self.transformer.proj_out.out_features

    def _first_calls(self, args: tuple, kwargs: dict) -> None:
        schedule = self.state.schedule
        if schedule.cfg_rows is None:  # FLUX pipelines: B rows per call, true CFG as calls
            schedule.cfg_rows = False

    def _begin_pruned(self, args: tuple, kwargs: dict):
        state, schedule = self.state, self.state.schedule
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

    def _output(self, sample: Tensor):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)

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

    # -- inside the call
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
        original,
        hidden_states,
        encoder_hidden_states=None,
        temb=None,
        image_rotary_emb=None,
        joint_attention_kwargs=None,
    ):
        t = self.transformer
        single = i >= len(t.transformer_blocks)
        block = t.single_transformer_blocks[i - len(t.transformer_blocks)] if single else (
            t.transformer_blocks[i]
        )  # fmt: skip
        cache_kwargs = self._block_kwargs()
        if cache_kwargs is not None:
            pruned = self.state.schedule.mode is Mode.PRUNED
            return (self._single if single else self._double)(
                block,
                self.state.caches.blocks[i],
                hidden_states,
                encoder_hidden_states,
                temb,
                image_rotary_emb,
                kv_rows=self._kv_rows if pruned else None,
                **cache_kwargs,
            )
        return self._own_forward(original, block, self._full.get(single))(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            image_rotary_emb=image_rotary_emb,
            joint_attention_kwargs=joint_attention_kwargs,
        )

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
