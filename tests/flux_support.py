"""Shared helpers of the FLUX tests: tiny `FluxPipeline`s built from configs
(catpatch.models.tiny, shape "tiny-flux"; the guidance-distilled layout "tiny-flux-dev"), their
generation call, the configurations they test and the image inputs of img2img and inpaint."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_pipe

from catpatch import CATConfig

CFG = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8)
EXACT = CFG.replace(keep_ratio=1.0)
TRUE_CFG = dict(true_cfg_scale=2.0, negative_prompt="a blue square")


def flux_pipe(shape: str = "tiny-flux", cls=None):
    return make_pipe(shape, cls)


def run(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    args = dict(
        prompt="a red circle", height=128, width=128, num_inference_steps=10,
        max_sequence_length=32, output_type="np", guidance_scale=3.5,
    )  # fmt: skip
    args.update(kwargs)
    return pipe(**args, generator=torch.Generator().manual_seed(seed)).images


def image_inputs(kind: str) -> dict:
    if kind == "text2img":
        return {}
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    kwargs = dict(image=image, strength=0.9, num_inference_steps=14)
    if kind == "inpaint":
        mask = torch.zeros(1, 1, 128, 128)
        mask[..., 32:96, 16:80] = 1.0
        kwargs.update(mask_image=mask)
    return kwargs
