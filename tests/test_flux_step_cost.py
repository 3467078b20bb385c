"""What a FLUX pruned step costs: the census at FLUX.1-dev's real shape (meta device, 1024²,
T=512, one row: guidance-distilled, no CFG pair) against the targets set for SD3."""

from __future__ import annotations

import json

import pytest

from catpatch import CATConfig
from catpatch.census import census
from catpatch.cli import main


@pytest.fixture(scope="module")
def flux_dev():
    return {
        lean: census(
            "flux-dev",
            1024,
            1024,
            CATConfig(selection="cat", lean=lean),
            cfg=False,
            text_tokens=512,
        )
        for lean in (True, False)
    }


def test_pruned_step_targets_at_flux_dev_1024(flux_dev):
    lean, dense = flux_dev[True], flux_dev[False]
    tokens, text, budget = 4096, 512, CATConfig(selection="cat").budget(4096)
    for c in (lean, dense):
        assert c.rows == 1 and c.full.flops > 0
        # attention and projections scale with (S+T)/(L+T) = 0.377; embedders do not
        assert 0.37 < c.pruned.flops / c.full.flops < 0.39
        assert (budget + text) / (tokens + text) == pytest.approx(0.377, abs=1e-3)
        assert c.pruned.kernels <= c.full.kernels, "a pruned step launches more kernels"
        assert c.selection.kernels <= 37 and c.selection.bytes < 0.001 * c.pruned.bytes
    # measured 0.932 / 0.398 (lean), 0.974 / 0.432 (dense)
    assert lean.pruned.kernels <= 0.95 * lean.full.kernels
    assert lean.pruned.other_bytes <= 0.40 * lean.full.other_bytes
    assert dense.pruned.other_bytes <= 0.44 * dense.full.other_bytes
    # eager K/V writes: K joint, V text and V image per double block; K and V per single
    # block; then the last output (dense: + output caches and the stream)
    assert lean.pruned.ops["index_copy_"] == 19 * 3 + 38 * 2 + 1
    assert lean.cache_bytes < dense.cache_bytes < 6e9


def test_census_command_takes_flux_shapes(capsys):
    assert main(["census", "--shape", "tiny-flux", "--size", "128x128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == "tiny-flux"
    assert out["pruned"]["flops"] < out["full"]["flops"]  # (4 blocks: the selection's
    # kernels are not paid back at this depth; the kernel target is for the real shape)
