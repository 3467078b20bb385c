"""The PixArt-Σ model adapter: where CAT plugs into `PixArtTransformer2DModel`.

All knowledge of the diffusers layout lives here (the hooks every family shares are in
`catpatch.adapter`). The transformer's own `forward` stays in
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

import torch
from torch import Tensor

from ..adapter import ModelAdapter, call_argument, check_processors, randn
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
    check_processors(transformer, KNOWN_PROCESSORS, "AttnProcessor2_0")


def _is_cfg_pair(hidden: Tensor) -> bool:
    """Whether a batch is a classifier-free-guidance pair: diffusers stacks the same latents
    twice, [uncond..., cond...]. Reads values on the host: once per run, at its first call."""
    rows = hidden.shape[0]
    return rows % 2 == 0 and torch.equal(hidden[: rows // 2], hidden[rows // 2 :])


class PixArtAdapter(ModelAdapter):
    """Hooks CAT into one `PixArtTransformer2DModel` instance; `remove()` undoes it exactly."""

    check = staticmethod(check_transformer)
    block_function = staticmethod(cat_block_forward)
    timestep_position = 2
    joint_text = False  # cross-attention: the K/V cache holds image tokens only
    text_tokens = 300  # the PixArt-Σ pipeline's max_sequence_length (T5)

    @staticmethod
    def example_conditioning(
        config, rows: int, text_tokens: int, device=None, dtype=None, generator=None
    ) -> dict:
        """Random text conditioning of a transformer call (everything but the latents and the
        timestep), for benchmarks and the census."""
        shape = (rows, text_tokens, config.caption_channels)
        return dict(
            encoder_hidden_states=randn(shape, generator, device=device, dtype=dtype),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )

    def __init__(self, transformer, state: CATState):
        super().__init__(transformer, state)
        config = transformer.config
        if config.out_channels == 2 * config.in_channels:  # learned sigma
            state.drift_view = functools.partial(
                _noise_channels, patch=config.patch_size, channels=config.in_channels
            )

    def remove(self) -> None:
        super().remove()
        self.state.drift_view = None

    def cost_model(self) -> PixArtDims:
        return PixArtDims.from_config(self.transformer.config)

    # -- transformer call
    def _first_calls(self, args: tuple, kwargs: dict) -> None:
        schedule = self.state.schedule
        if schedule.step == 0:
            # processors set after apply_cat (attention slicing, ...) would be bypassed on
            # pruned steps: refuse them at the run's first call, before anything is pruned
            check_transformer(self.transformer)
            if schedule.cfg_rows is None:
                hidden = call_argument(args, kwargs, "hidden_states", 0)
                schedule.cfg_rows = _is_cfg_pair(hidden)

    def _output(self, sample: Tensor):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)

    def _block_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The cache shapes of each block for this run's geometry (see `BlockCache`)."""
        schedule, lean = self.state.schedule, self.state.config.lean
        geo, dim = schedule.geometry, self.transformer.inner_dim
        entry = {"kv": (2, geo.rows, geo.tokens, dim)}
        if not lean:
            outputs = (schedule.groups, geo.tokens, dim)  # the driver rows only
            entry.update(attn=outputs, attn2=outputs, ff=outputs)
        return [dict(entry) for _ in self.transformer.transformer_blocks]

    # -- inside the call
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
        block = self.transformer.transformer_blocks[i]
        cache_kwargs = self._block_kwargs()
        if cache_kwargs is not None:
            return self._block_fn(
                block,
                self.state.caches.blocks[i],
                hidden_states,
                encoder_hidden_states,
                timestep,
                encoder_attention_mask,
                attention_mask,
                **cache_kwargs,
            )
        return self._own_forward(original, block, self._full_fn)(
            hidden_states,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            cross_attention_kwargs=cross_attention_kwargs,
            class_labels=class_labels,
            added_cond_kwargs=added_cond_kwargs,
        )


def _noise_channels(output: Tensor, patch: int, channels: int) -> Tensor:
    """The noise prediction of a learned-sigma output (R, L, p·p·2C): per latent pixel the
    first C of its 2·C channels (diffusers' unpatchify order) -> (R, L, p·p·C)."""
    rows, tokens = output.shape[:2]
    return output.view(rows, tokens, patch * patch, 2 * channels)[..., :channels].reshape(
        rows, tokens, patch * patch * channels
    )
