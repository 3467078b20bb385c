"""Quality regression on the trained toy model: CAT at α 0.3 stays close to unpatched.

The floors come from the quality study (`catpatch study`, README "Quality"): on these four
evaluation captions CAT measured 30.7-37.2 dB PSNR against the unpatched images (mean 33.4);
the floors leave about 3 dB of margin, so a change that breaks the pruned path (wrong cache,
wrong selection, stale reference) fails here. CAT also measured 1.6 dB above random selection
at the same budget on them (random: 30.1-34.4 dB): a selection that degrades to no better than
random fails too.
"""

from __future__ import annotations

import numpy as np
import pytest

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat, toy
from catpatch.cli.study import fidelity

FLOOR_EACH_DB = 27.5
FLOOR_MEAN_DB = 30.5


@pytest.fixture(scope="module")
def runs():
    pipe = toy.load_pipeline()
    prompts = toy.eval_prompts(4)
    base = toy.generate(pipe, prompts, batch_size=4)
    apply_cat(pipe, CATConfig(keep_ratio=0.3, warmup_steps=8, num_clusters=20))
    cat = toy.generate(pipe, prompts, batch_size=4)
    stats = cat_stats(pipe)
    apply_cat(pipe, CATConfig(keep_ratio=0.3, selection="random"))
    random = toy.generate(pipe, prompts, batch_size=4)
    remove_cat(pipe)
    return base, cat, stats, random


def test_cat_stays_close_to_unpatched(runs):
    base, cat, stats, _ = runs
    assert stats.steps == 28 and stats.pruned_steps == 20 and stats.budget == 76
    psnr, ssim = fidelity(cat, base)
    assert np.all(psnr >= FLOOR_EACH_DB), psnr
    assert psnr.mean() >= FLOOR_MEAN_DB, psnr
    assert np.all(ssim >= 0.8), ssim
    assert np.all(psnr < 60), "CAT changed nothing: the pruned path did not run"


def test_cat_beats_random_selection_at_the_same_budget(runs):
    base, cat, _, random = runs
    assert fidelity(cat, base)[0].mean() > fidelity(random, base)[0].mean() + 0.5
