"""The scenes model's architecture: a complete `StableDiffusion3Pipeline` at small size.

96 px images, a VAE with scale factor 2 (48 x 48 latents) and patch size 2: 24 x 24 = 576
image tokens. Captions are up to 20 words: 24 CLIP and 24 T5 tokens, so T = 48 text tokens
against L = 576 (T/L 0.083; SD3-medium at 1024² has 333 / 4096 = 0.081). Text encoders are
seeded random and frozen; the VAE and the transformer are trained by `catpatch.trained.train`.
"""

from __future__ import annotations

from typing import Any

from ..models import tiny
from ..trained import build
from .data import CLIP_LENGTH, IMAGE_SIZE, MAX_SEQUENCE_LENGTH, WORDS

T5_LENGTH = MAX_SEQUENCE_LENGTH
LATENT_CHANNELS = 16
VAE_BLOCKS = 2  # vae_scale_factor 2: 96 px -> 48 x 48 latents -> 24 x 24 = 576 tokens
VAE_CHANNELS = 32
TEXT_DIM = 64  # T5 d_model = joint_attention_dim
CLIP_PROJ = 32  # each CLIP's projection; pooled_projection_dim = 2 * CLIP_PROJ
LATENT_SIZE = IMAGE_SIZE // 2 ** (VAE_BLOCKS - 1)

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=LATENT_SIZE,
    patch_size=2,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_layers=6,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=TEXT_DIM,
    caption_projection_dim=128,
    pooled_projection_dim=2 * CLIP_PROJ,
    pos_embed_max_size=LATENT_SIZE // 2,
    dual_attention_layers=(),
    qk_norm="rms_norm",
)
SCHEDULER_SHIFT = 3.0


def vocabulary() -> tuple[str, ...]:
    """Words the tokenizers hold as single tokens: the caption words and common prompt words."""
    return tuple(dict.fromkeys(WORDS + tuple(tiny.BASE_WORDS)))


def text_components(seed: int = 0) -> dict[str, Any]:
    """The three tokenizers and three seeded random, frozen text encoders."""
    return tiny.text_components(
        vocabulary(), seed, clip_length=CLIP_LENGTH, clip_projection=CLIP_PROJ,
        t5_dim=TEXT_DIM, t5_ff=128, t5_kv=32,
    )  # fmt: skip


def vae_model(seed: int = 0):
    """An untrained `AutoencoderKL` (SD3 layout: 16 latent channels, no quant convs)."""
    return tiny.vae(
        seed, VAE_BLOCKS, VAE_CHANNELS, LATENT_CHANNELS, IMAGE_SIZE,
        scaling_factor=1.0, shift_factor=0.0,
    ).train()  # fmt: skip


def transformer_model(seed: int = 0):
    """An untrained `SD3Transformer2DModel` of `TRANSFORMER_CONFIG`, output projection zeroed."""
    return build.transformer_model(seed, TRANSFORMER_CONFIG)


def assemble(transformer, vae, text: dict[str, Any]):
    """A `StableDiffusion3Pipeline` from its trained parts and the text components."""
    return build.assemble(transformer, vae, text, SCHEDULER_SHIFT)
