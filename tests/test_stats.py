"""Cost accounting: a hand calculation, the spec's headline ratios, and torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from conftest import generate
from torch.utils.flop_counter import FlopCounterMode

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats
from catpatch.models.shapes import SHAPES, build_transformer
from catpatch.stats import ModelDims, count_cpu_attention, run_bound, run_macs, step_macs


def test_cat_stats_against_hand_calculation(pipe):
    apply_cat(
        pipe, CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8, lean=False)
    )
    generate(pipe, num_inference_steps=10)
    stats = cat_stats(pipe)
    assert (stats.steps, stats.pruned_steps, stats.tokens, stats.budget) == (10, 6, 256, 76)
    assert (stats.text_tokens, stats.rows) == (333, 2)
    assert stats.per_step[3] == ("record", 256, 256) and stats.per_step[4] == ("pruned", 76, 256)
    assert stats.computed_fraction == pytest.approx((4 * 256 + 6 * 76) / (10 * 256))

    # tiny-sd3 by hand: D=32, 4 blocks (the last without text output/FFN), patch 2,
    # 16 latent channels, T5 width 64, pooled 64, T=333, L=256, S=76
    D, L, T, S = 32, 256, 333, 76
    outer = L * 4 * 16 * D + T * 64 * D + (256 * D + D * D + 64 * D + D * D) + 2 * D * D
    projection = D * 4 * 16  # proj_out per token: all L tokens (lean: the S computed ones)

    def block(n, last):
        image = 12 * D * D * n
        text = (3 if last else 12) * D * D * T
        modulation = 6 * D * D + (2 if last else 6) * D * D
        return image + text + 2 * D * (n + T) * (L + T) + modulation

    full = outer + L * projection + 3 * block(L, False) + block(L, True)
    pruned = outer + L * projection + 3 * block(S, False) + block(S, True)
    assert stats.macs_unpatched == 2 * 10 * full
    assert stats.macs == 2 * (4 * full + 6 * pruned)
    assert stats.macs_ratio == pytest.approx(stats.macs / stats.macs_unpatched)
    assert "6 pruned" in stats.summary()
    apply_cat(
        pipe, CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8, lean=True)
    )
    generate(pipe, num_inference_steps=10)
    lean = outer + S * projection + 3 * block(S, False) + block(S, True)
    assert cat_stats(pipe).macs == 2 * (4 * full + 6 * lean)


@pytest.mark.parametrize("steps,expected", [(28, 0.54), (50, 0.46)])
def test_sd3_medium_headline_ratio(steps, expected):
    """The spec: SD3-medium, 1024² (L=4096), α 0.3, t0 8 -> 0.54 of the MACs at 28 steps."""
    dims = ModelDims.from_config(SHAPES["sd3-medium"])
    budget = CATConfig(selection="cat").budget(4096)
    assert budget == 1228
    cut, full = run_macs(dims, 2, 4096, 333, budget, steps, steps - 8)
    assert round(cut / full, 2) == expected
    assert run_bound(28, 8, 4096, 333, 1228) == pytest.approx(1.86, abs=0.01)


count_cpu_attention()


@pytest.mark.parametrize("shape", ["tiny-sd3", "tiny-sd3.5-medium"])
def test_macs_match_flop_counter(shape):
    torch.manual_seed(0)
    model = build_transformer(shape)
    config = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=2, num_clusters=4)
    apply_cat(model, config)
    rows, text = 2, 40
    args = dict(
        encoder_hidden_states=torch.randn(rows, text, 64),
        pooled_projections=torch.randn(rows, 64),
        timestep=torch.full((rows,), 500.0),
    )
    latents = torch.randn(rows, 16, 32, 32)
    tokens = 16 * 16
    dims = ModelDims.from_config(model.config)
    counted = []
    with torch.no_grad(), cat_generation(model):
        for _ in range(3):
            with FlopCounterMode(display=False) as counter:
                model(hidden_states=latents, **args)
            counted.append(counter.get_total_flops() / 2)  # FLOPs -> MACs
    full = rows * step_macs(dims, tokens, text)
    pruned = rows * step_macs(dims, tokens, text, config.budget(tokens), config.lean)
    # The cost model is exact for the matrix products torch counts (ratio 1.000 on both
    # layouts): 1% catches a pruned step that does a few percent of extra work.
    steps = zip(("reference", "recording", "pruned"), counted, (full, full, pruned), strict=True)
    for step, got, model_macs in steps:
        ratio = got / model_macs
        assert ratio == pytest.approx(1.0, abs=0.01), f"{step} step: {ratio:.3f}x the cost model"
    assert counted[2] < 0.7 * counted[0]


def test_cat_with_step_reuse_halves_sd3_medium_macs():
    """SD3-medium at 1024², CFG pair, 28 steps: CAT alone costs about 0.54 of the unpatched
    MACs; "cat+reuse" at its default target skips enough steps to reach 0.50 (a 2x bound)."""
    from catpatch.models.shapes import transformer_config
    from catpatch.policies.step_reuse import PrunedStepReuse

    config = CATConfig(selection="cat+reuse")
    dims = ModelDims.from_config(transformer_config("sd3-medium"))
    tokens, text, steps = 4096, 333, 28
    budget = config.budget(tokens)
    ratio = step_macs(dims, tokens, text, budget) / step_macs(dims, tokens, text)
    policy = PrunedStepReuse(config)
    policy.plan(steps, ratio)
    pruned = len(policy.compute_steps)
    reused = steps - config.warmup_steps - pruned
    macs, unpatched = run_macs(dims, 2, tokens, text, budget, steps, pruned, reused)
    cat_alone, _ = run_macs(dims, 2, tokens, text, budget, steps, steps - config.warmup_steps)
    assert cat_alone / unpatched > 0.52 and 0.45 < macs / unpatched <= 0.50
    assert all(policy.runs_model(s) for s in range(config.warmup_steps))


def test_first_order_forecast_of_a_skipped_step():
    from catpatch.policies.step_reuse import StepReuse

    policy = StepReuse(CATConfig(selection="step", reuse_order=1))
    policy.observe(torch.tensor([1.0, 2.0]), 3)
    policy.observe(torch.tensor([2.0, 2.0]), 5)
    torch.testing.assert_close(policy.output(6), torch.tensor([2.5, 2.0]))
    zeroth = StepReuse(CATConfig(selection="step", reuse_order=0))
    zeroth.observe(torch.tensor([1.0]), 3)
    zeroth.observe(torch.tensor([2.0]), 5)
    assert zeroth.output(6).item() == 2.0
