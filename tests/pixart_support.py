"""Shared helpers of the PixArt-Σ tests (test_pixart_*.py): a tiny `PixArtSigmaPipeline` built
offline, its generation call, the configurations they test and a transformer call's inputs."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_pipe

from catpatch import CATConfig

SHAPE = "tiny-pixart-sigma"
CFG = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8)
EXACT = CFG.replace(keep_ratio=1.0)
TOL = dict(atol=2e-5, rtol=1e-4)


def pixart(seed: int = 0):
    return make_pipe(SHAPE, seed=seed)


def generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    """Images as float arrays: 128x128, 10 steps, no resolution binning unless asked."""
    args = dict(
        prompt="a red circle", height=128, width=128, num_inference_steps=10,
        use_resolution_binning=False, clean_caption=False, output_type="np",
    )  # fmt: skip
    args.update(kwargs)
    return pipe(**args, generator=torch.Generator().manual_seed(seed)).images


def model_inputs(rows: int, text: int = 9, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        encoder_hidden_states=torch.randn(rows, text, 64, generator=gen),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
