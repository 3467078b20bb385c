"""CAT on a bare SD3 transformer inside your own denoising loop.

Each generation is wrapped in `cat_generation`: every transformer call inside is one step, and
the caches are freed when the block exits.

    python examples/own_loop.py              # a tiny random-weight transformer, 12 steps
    python examples/own_loop.py --steps 6    # fewer steps (a quick check)
"""

from __future__ import annotations

import argparse

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats
from catpatch.models.shapes import build_transformer


def main(steps: int = 12) -> None:
    transformer = build_transformer("tiny-sd3")  # or SD3Transformer2DModel.from_pretrained(...)
    config = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8)
    apply_cat(transformer, config)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 16, 32, 32)
    text = torch.randn(1, 77, 64)  # your encoded prompt (joint_attention_dim wide)
    pooled = torch.randn(1, 64)
    with torch.no_grad(), cat_generation(transformer, num_inference_steps=steps):
        for t in scheduler.timesteps:
            velocity = transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=t.expand(1),
            ).sample
            latents = scheduler.step(velocity, t, latents).prev_sample
    print(cat_stats(transformer).summary())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=12, help="denoising steps (> 4 to prune)")
    main(parser.parse_args().steps)
