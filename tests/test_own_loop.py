"""CAT in a user's own denoising loop (`cat_generation`, as in examples/own_loop.py): what each
transformer call returns."""

from __future__ import annotations

import torch

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats
from catpatch.models.shapes import build_transformer


def _inputs(rows: int = 1) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(
        encoder_hidden_states=torch.randn(rows, 9, 64, generator=gen),
        pooled_projections=torch.randn(rows, 64, generator=gen),
    )


def test_a_skipped_step_returns_what_the_model_returns():
    """The default policy skips whole steps: a skipped call must return the model's own output
    type for the same call (an object with `.sample` by default, a tuple under
    `return_dict=False`), or a loop written for the unpatched model breaks."""
    torch.manual_seed(0)
    model = build_transformer("tiny-sd3")
    inputs, steps = _inputs(), 8
    with torch.no_grad():
        plain = model(hidden_states=torch.randn(1, 16, 16, 16), timestep=torch.ones(1), **inputs)
    # the shipped default policy (step reuse), with a warm-up short enough to skip steps in 8
    apply_cat(model, CATConfig(warmup_steps=3))
    with torch.no_grad(), cat_generation(model, num_inference_steps=steps):
        for step in range(steps):
            x = torch.randn(1, 16, 16, 16)
            t = torch.full((1,), 1000.0 - 100 * step)
            out = model(hidden_states=x, timestep=t, **inputs)
            assert type(out) is type(plain), (step, type(out))
            assert out.sample.shape == x.shape
    stats = cat_stats(model)
    assert stats.reused_steps > 0, "no step was skipped: the test checks nothing"
    with torch.no_grad(), cat_generation(model, num_inference_steps=steps):
        for step in range(steps):
            x = torch.randn(1, 16, 16, 16)
            t = torch.full((1,), 1000.0 - 100 * step)
            out = model(hidden_states=x, timestep=t, return_dict=False, **inputs)
            assert isinstance(out, tuple) and out[0].shape == x.shape, (step, type(out))
    assert cat_stats(model).reused_steps == stats.reused_steps
