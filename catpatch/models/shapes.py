"""Named transformer shapes (SD3 family, FLUX.1, PixArt-Σ), for benchmarks and tests with
random weights.

Speed does not depend on weight values, so a transformer built from one of these configs with
random weights times the same as the released checkpoint of that shape.
"""

from __future__ import annotations

from typing import Any

# Real shapes, read off the released checkpoints' transformer configs.
_SD3_MEDIUM: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    dual_attention_layers=(),
    qk_norm=None,
)

SHAPES: dict[str, dict[str, Any]] = {
    "sd3-medium": _SD3_MEDIUM,
    "sd3.5-medium": {
        **_SD3_MEDIUM,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
        "qk_norm": "rms_norm",
    },
    "sd3.5-large": {
        **_SD3_MEDIUM,
        "num_layers": 38,
        "num_attention_heads": 38,
        "caption_projection_dim": 2432,
        "qk_norm": "rms_norm",
    },
    # CPU benchmark shape: width 256, 8 layers (the CPU target).
    "cpu-256x8": {
        **_SD3_MEDIUM,
        "num_layers": 8,
        "num_attention_heads": 4,
        "caption_projection_dim": 256,
        "joint_attention_dim": 256,
        "pooled_projection_dim": 64,
    },
    # Tiny shapes for tests: the three SD3-family layouts at toy size.
    "tiny-sd3": {
        **_SD3_MEDIUM,
        "sample_size": 32,
        "num_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "caption_projection_dim": 32,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "pos_embed_max_size": 96,
    },
}
SHAPES["tiny-sd3.5-medium"] = {
    **SHAPES["tiny-sd3"],
    "dual_attention_layers": (0, 1),
    "qk_norm": "rms_norm",
}
SHAPES["tiny-sd3.5-large"] = {**SHAPES["tiny-sd3"], "num_layers": 5, "qk_norm": "rms_norm"}

# PixArt-Σ (PixArt-Sigma-XL-2-1024-MS's transformer config); "_class_name" as in a saved
# config.json names the diffusers class (SD3Transformer2DModel where absent).
_PIXART_SIGMA: dict[str, Any] = dict(
    _class_name="PixArtTransformer2DModel",
    sample_size=128,
    patch_size=2,
    in_channels=4,
    out_channels=8,  # learned sigma: noise and variance
    num_layers=28,
    attention_head_dim=72,
    num_attention_heads=16,
    cross_attention_dim=1152,
    caption_channels=4096,  # T5-XXL
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=2,
    use_additional_conditions=False,
)
SHAPES["pixart-sigma"] = _PIXART_SIGMA
# Tiny PixArt-Σ for tests: sample size 32 keeps the pipeline's 256-pixel resolution bins.
SHAPES["tiny-pixart-sigma"] = {
    **_PIXART_SIGMA,
    "sample_size": 32,
    "num_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "cross_attention_dim": 32,
    "caption_channels": 64,
    "interpolation_scale": 1,
}

# FLUX.1 (`FluxTransformer2DModel`), read off the released transformer configs: 19 double- and
# 38 single-stream blocks, 24 heads x 128; dev is guidance-distilled (a guidance embedding).
_FLUX_DEV: dict[str, Any] = dict(
    _class_name="FluxTransformer2DModel",
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SHAPES: dict[str, dict[str, Any]] = {
    "flux-dev": _FLUX_DEV,
    "flux-schnell": {**_FLUX_DEV, "guidance_embeds": False},
    # Tiny FLUX for tests: 2 double + 2 single blocks, width 32, 4 latent channels packed 2x2.
    "tiny-flux": {
        **_FLUX_DEV,
        "in_channels": 16,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": False,
        "axes_dims_rope": (4, 6, 6),
    },
}
FLUX_SHAPES["tiny-flux-dev"] = {**FLUX_SHAPES["tiny-flux"], "guidance_embeds": True}
SHAPES.update(FLUX_SHAPES)


SD3_CLASS = "SD3Transformer2DModel"


def is_flux(shape: str) -> bool:
    """Whether the named shape is a FLUX.1 transformer."""
    return shape in FLUX_SHAPES


def transformer_class_name(shape: str) -> str:
    """The diffusers transformer class of a named shape."""
    return transformer_config(shape).get("_class_name", SD3_CLASS)


def transformer_config(shape: str, **overrides: Any) -> dict[str, Any]:
    """The transformer config of a named shape, with optional overrides (a "_class_name" key
    names a class other than `SD3Transformer2DModel`)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    return {**SHAPES[shape], **overrides}


def build_transformer(shape: str, seed: int = 0, device=None, dtype=None, **overrides: Any):
    """The transformer of a named shape with seeded random weights, initialised directly on
    `device` (CPU by default: large shapes initialise much faster on a GPU)."""
    import diffusers
    import torch

    device = torch.device(device or "cpu")
    devices = [device.index or 0] if device.type == "cuda" else []
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=devices), device:
        torch.manual_seed(seed)
        # made in `dtype` directly: no fp32 copy first (SD3.5-large is 8B parameters)
        torch.set_default_dtype(dtype or default)
        try:
            config = transformer_config(shape, **overrides)
            cls = getattr(diffusers, config.pop("_class_name", SD3_CLASS))
            model = cls(**config)
        finally:
            torch.set_default_dtype(default)
    return model.eval()
