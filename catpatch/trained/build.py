"""What every shipped model's build module shares: an untrained SD3 transformer of its config
and the pipeline assembled from its parts. Each model's own `build` (`catpatch.toy.build`,
`catpatch.scenes.build`) holds its sizes, text components and VAE.
"""

from __future__ import annotations

from typing import Any

import torch


def transformer_model(seed: int, config: dict[str, Any]):
    """An untrained `SD3Transformer2DModel` of `config`, output projection zeroed (training
    starts from predicting zero velocity)."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        model = SD3Transformer2DModel(**config)
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    return model


def assemble(transformer, vae, text: dict[str, Any], shift: float):
    """A `StableDiffusion3Pipeline` from trained parts, text components and the flow-matching
    scheduler's `shift`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        **text,
    )
