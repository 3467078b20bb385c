"""The SD3-family model adapter: where CAT plugs into `SD3Transformer2DModel`.

All knowledge of the diffusers layout lives here (the hooks every family shares are in
`catpatch.adapter`). The transformer's own `forward` stays in charge (LoRA scaling, skip
layers, ControlNet residuals, unpatchify); CAT changes it at five points, all on this model
instance:

- transformer pre/post hooks: decide the step's mode, count steps, gather ControlNet residuals;
- `pos_embed` output: on a pruned step only the selected tokens enter the blocks;
- each block's `forward`: on the recording step and on pruned steps, our block function;
- `norm_out` input: the dense residual stream of all tokens, with the computed tokens in place;
- `proj_out` output: unselected tokens take their previous output; the next selection is made.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapter import ModelAdapter, call_argument, check_processors, randn, refuse_ip_adapter
from ..caches import gather_tokens
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
    refuse_ip_adapter(transformer, "image_proj")
    check_processors(transformer, KNOWN_PROCESSORS, "JointAttnProcessor2_0")


class SD3Adapter(ModelAdapter):
    """Hooks CAT into one `SD3Transformer2DModel` instance; `remove()` undoes it exactly."""

    check = staticmethod(check_transformer)
    calls_per_step: int | None = 1  # one call per step (CFG batched; SLG calls pass through)
    block_function = staticmethod(cat_block_forward)
    text_tokens = 333  # CLIP 77 + T5 256: what the SD3 pipelines pass
    anchor_steps = True

    @staticmethod
    def example_conditioning(
        config, rows: int, text_tokens: int, device=None, dtype=None, generator=None
    ) -> dict:
        """Random text conditioning of a transformer call (everything but the latents and the
        timestep), for benchmarks and the census."""
        like = dict(device=device, dtype=dtype)
        return dict(
            encoder_hidden_states=randn(
                (rows, text_tokens, config.joint_attention_dim), generator, **like
            ),
            pooled_projections=randn((rows, config.pooled_projection_dim), generator, **like),
        )

    def __init__(self, transformer, state: CATState):
        super().__init__(transformer, state)
        self.controlnet: list[Tensor] | None = None
        self._temb: tuple[Tensor, Tensor] | None = None  # this call's (temb, silu(temb))
        state.sample_tokens = self.sample_tokens

    def sample_tokens(self, sample: Tensor) -> Tensor:
        """The transformer's output (R, C, H·p, W·p) as its tokens (R, L, p·p·C): the inverse
        of its unpatchify."""
        p = self.transformer.config.patch_size
        rows, channels, height, width = sample.shape
        grid = sample.reshape(rows, channels, height // p, p, width // p, p)
        return grid.permute(0, 2, 4, 3, 5, 1).reshape(rows, -1, p * p * channels)

    def cost_model(self):
        """The MAC model of this transformer (`stats.ModelDims`)."""
        from ..stats import ModelDims

        return ModelDims.from_config(self.transformer.config)

    # -- transformer call
    def _extra_call(self, args: tuple, kwargs: dict) -> bool:
        # skip-layer guidance: an extra call inside the same step
        return call_argument(args, kwargs, "skip_layers", 7) is not None

    def _begin_pruned(self, args: tuple, kwargs: dict):
        index = self.state.begin_pruned_step().index
        controlnet = kwargs.get("block_controlnet_hidden_states")
        self.controlnet = controlnet
        if controlnet is not None:
            kwargs = dict(kwargs)
            kwargs["block_controlnet_hidden_states"] = [gather_tokens(c, index) for c in controlnet]
            return args, kwargs
        return None

    def _end_call(self) -> None:
        super()._end_call()
        self._temb = None

    def _output(self, sample: Tensor):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)

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

    # -- inside the call
    def _block_forward(
        self,
        i: int,
        original,
        hidden_states,
        encoder_hidden_states=None,
        temb=None,
        joint_attention_kwargs=None,
    ):
        block = self.transformer.transformer_blocks[i]
        cache_kwargs = self._block_kwargs()
        if cache_kwargs is not None:
            return self._block_fn(
                block,
                self.state.caches.blocks[i],
                hidden_states,
                encoder_hidden_states,
                temb,
                temb_act=self._temb_act(temb),
                **cache_kwargs,
            )
        return self._own_forward(original, block, self._full_fn)(
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

    def _add_controlnet(self, dense: Tensor) -> None:
        # The transformer adds ControlNet residuals after every block but the last.
        rows = self.state.schedule.driver_slice
        blocks = self.transformer.transformer_blocks
        interval = len(blocks) / len(self.controlnet)
        for i, block in enumerate(blocks):
            if block.context_pre_only is False:
                dense.add_(self.controlnet[int(i / interval)][rows])
