"""Transformer call inputs of a FLUX pipeline at a pixel size, for the census and the bench.

FLUX pipelines encode the image with an 8x VAE and pack 2x2 latents per token: L =
(H/16)·(W/16) image tokens of 4·C features, position ids (0, row, col) per image token and
zeros per text token, the timestep as sigma in [0, 1], and a guidance value per row when the
model is guidance-distilled (FLUX.1-dev).
"""

from __future__ import annotations

from typing import Any

import torch

PIXELS_PER_TOKEN = 16  # 8x VAE, then 2x2 latents per token


def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """(L, 3) float position ids of a token grid in raster order, as FLUX pipelines make them."""
    ids = torch.zeros(height, width, 3, device=device)
    ids[..., 1] += torch.arange(height, device=device)[:, None]
    ids[..., 2] += torch.arange(width, device=device)[None, :]
    return ids.reshape(-1, 3)


def call_inputs(
    config: Any, rows: int, height: int, width: int, text_tokens: int, device=None, dtype=None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Random keyword arguments of one transformer call at `height` x `width` pixels (the
    timestep excluded). On the meta device the tensors are shape-only."""
    h, w = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    meta = torch.device(device).type == "meta" if device is not None else False

    def rand(*shape):
        if meta:
            return torch.zeros(*shape, device="meta", dtype=dtype)
        return torch.randn(*shape, generator=generator).to(device, dtype)

    inputs = dict(
        hidden_states=rand(rows, h * w, get("in_channels")),
        encoder_hidden_states=rand(rows, text_tokens, get("joint_attention_dim")),
        pooled_projections=rand(rows, get("pooled_projection_dim")),
        img_ids=image_ids(h, w, "cpu" if meta else device),
        txt_ids=torch.zeros(text_tokens, 3, device="cpu" if meta else device),
    )
    if meta:  # shape-only ids (the adapter takes the grid of meta ids as square)
        inputs["img_ids"] = inputs["img_ids"].to("meta")
        inputs["txt_ids"] = inputs["txt_ids"].to("meta")
    if get("guidance_embeds", False):
        inputs["guidance"] = torch.full((rows,), 3.5, device="meta" if meta else device)
    return inputs
