"""The toy model's architecture: a complete `StableDiffusion3Pipeline` at small size.

The text encoders are seeded random and stay frozen; the VAE and transformer start here and are
trained by `catpatch.trained.train`. The T5 sequence is 16 tokens (`T5_LENGTH`, the pipeline call's
`max_sequence_length`, see `catpatch.toy.CALL_KWARGS`), so the toy has 32 text tokens against
256 image tokens: SD3-medium's ratio at 1024² (333 against 4096), where pruning pays.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models import tiny
from ..trained import build
from .data import CLIP_LENGTH, IMAGE_SIZE, MAX_SEQUENCE_LENGTH, WORDS

T5_LENGTH = MAX_SEQUENCE_LENGTH  # the longest caption is 15 T5 tokens with its end token
LATENT_CHANNELS = 16
VAE_BLOCKS = 2  # vae_scale_factor 2: 64 px images -> 32 x 32 latents -> 16 x 16 = 256 tokens
VAE_CHANNELS = (32, 32)
TEXT_DIM = 64  # T5 d_model = joint_attention_dim
CLIP_PROJ = 32  # each CLIP's projection; pooled_projection_dim = 2 * CLIP_PROJ

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=IMAGE_SIZE // 2 ** (VAE_BLOCKS - 1),
    patch_size=2,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_layers=6,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=TEXT_DIM,
    caption_projection_dim=128,
    pooled_projection_dim=2 * CLIP_PROJ,
    pos_embed_max_size=IMAGE_SIZE // 2 ** (VAE_BLOCKS - 1) // 2,
    dual_attention_layers=(),
    qk_norm="rms_norm",
)
SCHEDULER_SHIFT = 3.0


def vocabulary() -> tuple[str, ...]:
    """Words the tokenizers hold as single tokens: the caption words and common prompt words."""
    return tuple(dict.fromkeys(WORDS + tuple(tiny.BASE_WORDS)))


def text_components(seed: int = 0) -> dict[str, Any]:
    """The three tokenizers and three seeded random, frozen text encoders, with the T5
    relative position bias zeroed (as the toy was first built; it is kept for the seeds)."""
    text = tiny.text_components(
        vocabulary(), seed, clip_length=CLIP_LENGTH, clip_projection=CLIP_PROJ,
        t5_dim=TEXT_DIM, t5_ff=128, t5_kv=32,
    )  # fmt: skip
    with torch.no_grad():
        for module in text["text_encoder_3"].modules():
            bias = getattr(module, "relative_attention_bias", None)
            if bias is not None:
                bias.weight.zero_()
    return text


def vae_model(seed: int = 0):
    """An untrained `AutoencoderKL` (SD3 layout: 16 latent channels, no quant convs)."""
    return tiny.vae(
        seed, VAE_BLOCKS, VAE_CHANNELS[0], LATENT_CHANNELS, IMAGE_SIZE,
        scaling_factor=1.0, shift_factor=0.0,
    ).train()  # fmt: skip


def transformer_model(seed: int = 0):
    """An untrained `SD3Transformer2DModel` of `TRANSFORMER_CONFIG`, output projection zeroed."""
    return build.transformer_model(seed, TRANSFORMER_CONFIG)


def assemble(transformer, vae, text: dict[str, Any]):
    """A `StableDiffusion3Pipeline` from its trained parts and the text components."""
    return build.assemble(transformer, vae, text, SCHEDULER_SHIFT)
