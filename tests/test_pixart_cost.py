"""What CAT costs on PixArt-Σ: the cost model by hand and against torch's flop counter, the
headline ratio, the census at the real 1024² shape and `catpatch bench --json` (mirrors
test_stats for SD3).
"""

from __future__ import annotations

import pytest
import torch
from pixart_support import CFG, SHAPE, generate, model_inputs, pixart
from torch.utils.flop_counter import FlopCounterMode

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats
from catpatch.models.shapes import build_transformer
from catpatch.pixart import PixArtDims
from catpatch.stats import count_cpu_attention


@pytest.fixture
def pipe():
    return pixart()


# ---- cost model -------------------------------------------------------------------------------
def test_cat_stats_against_hand_calculation(pipe):
    apply_cat(pipe, CFG.replace(lean=False))
    generate(pipe)
    stats = cat_stats(pipe)
    assert (stats.steps, stats.pruned_steps, stats.tokens, stats.budget) == (10, 6, 256, 76)
    # tiny-pixart-sigma by hand: D=32, 3 blocks, patch 2, 4 latent channels in, 8 out,
    # T5 width 64, T=300 text tokens, L=256, S=76
    D, L, T, S = 32, 256, 300, 76
    outer = L * 4 * 4 * D + T * (64 * D + D * D) + 256 * D + D * D + 6 * D * D

    def block(n):
        return 4 * D * D * n + 2 * D * n * L + 2 * D * D * n + 2 * D * D * T + 2 * D * n * T \
            + 8 * D * D * n  # fmt: skip

    full = outer + L * D * 4 * 8 + 3 * block(L)
    pruned = outer + L * D * 4 * 8 + 3 * block(S)
    assert stats.macs_unpatched == 2 * 10 * full
    assert stats.macs == 2 * (4 * full + 6 * pruned)
    apply_cat(pipe, CFG)  # lean: proj_out on the computed tokens only
    generate(pipe)
    lean = outer + S * D * 4 * 8 + 3 * block(S)
    assert cat_stats(pipe).macs == 2 * (4 * full + 6 * lean)


count_cpu_attention()


@pytest.mark.parametrize("masked", [False, True])
def test_macs_match_flop_counter(masked):
    torch.manual_seed(0)
    model = build_transformer(SHAPE)
    config = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=2, num_clusters=4)
    apply_cat(model, config)
    rows, text = 2, 40
    inputs = model_inputs(rows, text)
    if masked:
        inputs["encoder_attention_mask"] = torch.ones(rows, text)
    latents, timestep = torch.randn(rows, 4, 32, 32), torch.full((rows,), 500)
    dims, tokens = PixArtDims.from_config(model.config), 16 * 16
    counted = []
    with torch.no_grad(), cat_generation(model):
        for _ in range(3):
            with FlopCounterMode(display=False) as counter:
                model(hidden_states=latents, timestep=timestep, **inputs)
            counted.append(counter.get_total_flops() / 2)
    full = rows * dims.step_macs(tokens, text)
    pruned = rows * dims.step_macs(tokens, text, config.budget(tokens), config.lean)
    steps = zip(("reference", "recording", "pruned"), counted, (full, full, pruned), strict=True)
    for step, got, model_macs in steps:
        assert got / model_macs == pytest.approx(1.0, abs=0.01), f"{step}: {got / model_macs}"
    assert counted[2] < 0.6 * counted[0]


def test_pixart_sigma_headline_ratio():
    """PixArt-Σ at 1024² (L=4096, T=300), α 0.3, t0 8, CFG pair: MACs and bound."""
    from catpatch.models.shapes import SHAPES
    from catpatch.stats import run_macs

    dims = PixArtDims.from_config(SHAPES["pixart-sigma"])
    budget = CATConfig(selection="cat").budget(4096)
    cut, full = run_macs(dims, 2, 4096, 300, budget, 28, 20)
    assert 0.45 < cut / full < 0.55
    assert dims.run_bound(28, 8, 4096, 300, budget) == pytest.approx(full / cut)


# ---- census, bench ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sigma_census():
    from catpatch.census import census

    return {
        lean: census("pixart-sigma", 1024, 1024, CATConfig(selection="cat", lean=lean))
        for lean in (True, False)
    }


def test_census_at_pixart_sigma_1024(sigma_census):
    """The real PixArt-Σ shape at 1024² (L=4096, T=300, CFG pair, bf16) on the meta device:
    the default (lean) pruned step launches no more kernels than a full step and moves at most
    0.40 of its non-GEMM bytes."""
    lean, exact = sigma_census[True], sigma_census[False]
    for c in (lean, exact):
        assert 0.29 < c.pruned.flops / c.full.flops < 0.32
        assert c.selection.kernels <= 37
        assert c.pruned.ops["index_copy_"] >= 28 + 1  # one K/V write per block, the output
    assert lean.pruned.kernels <= lean.full.kernels
    assert lean.pruned.other_bytes <= 0.40 * lean.full.other_bytes
    # --no-lean keeps three output caches per block and the dense stream: reported, not a target
    assert exact.pruned.other_bytes <= 0.50 * exact.full.other_bytes
    assert lean.cache_bytes < exact.cache_bytes < 2e9


def test_bench_pixart_json(capsys):
    import json

    from catpatch.cli import main

    code = main([
        "bench", "--shape", "tiny-pixart-sigma", "--size", "128x128", "--steps", "6",
        "--selection", "cat", "--warmup-steps", "3", "--num-clusters", "8", "--repeats", "1",
        "--text-tokens", "16", "--device", "cpu", "--json",
    ])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 64 and result["budget"] == 19 and result["rows"] == 2
    assert result["speedup"] > 0 and result["bound"] > 1.0 and 0.3 < result["macs_ratio"] < 1.0
