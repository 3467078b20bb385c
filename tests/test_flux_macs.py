"""The FLUX cost model: `cat_stats` against a hand calculation and against torch's flop
counter."""

from __future__ import annotations

import pytest
from flux_support import CFG, flux_pipe, run

from catpatch import apply_cat, cat_stats
from catpatch.flux import FluxDims, step_macs
from catpatch.stats import count_cpu_attention, measured_macs


def test_cat_stats_against_hand_calculation():
    """tiny-flux by hand: D=32, 2 double + 2 single blocks, 16 features in and out per
    token, T5 width 32, pooled 32, no guidance embedding, T=32, L=256, S=76."""
    pipe = flux_pipe()
    apply_cat(pipe, CFG.replace(lean=False))
    run(pipe)
    stats = cat_stats(pipe)
    D, L, T, S = 32, 256, 32, 76
    outer = L * 16 * D + T * 32 * D + (256 * D + D * D) + (32 * D + D * D) + 2 * D * D

    def blocks(n):
        attention = 2 * D * (n + T) * (L + T)
        double = 12 * D * D * (n + T) + attention + 12 * D * D
        single = 12 * D * D * (n + T) + attention + 3 * D * D
        return 2 * double + 2 * single

    full = outer + L * D * 16 + blocks(L)
    pruned = outer + L * D * 16 + blocks(S)
    assert stats.macs_unpatched == 10 * full
    assert stats.macs == 4 * full + 6 * pruned
    apply_cat(pipe, CFG)
    run(pipe)
    lean = outer + S * D * 16 + blocks(S)
    assert cat_stats(pipe).macs == 4 * full + 6 * lean


count_cpu_attention()


@pytest.mark.parametrize("shape", ["tiny-flux", "tiny-flux-dev"])
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "dense"])
def test_macs_match_flop_counter(shape, lean):
    """The cost model is exact for the matrix products torch counts, for full, recording and
    pruned calls (`stats.measured_macs`, inside `FluxTransformer2DModel` only)."""
    pipe = flux_pipe(shape)
    config = CFG.replace(lean=lean)
    apply_cat(pipe, config)
    model = pipe.transformer
    measured = measured_macs(lambda: run(pipe), module="FluxTransformer2DModel")
    stats = cat_stats(pipe)
    assert measured == stats.macs, f"{measured / stats.macs:.4f}x the cost model"
    dims = FluxDims.from_config(model.config)
    assert stats.macs_unpatched == 10 * step_macs(dims, 256, 32)
