"""The quality study's machinery on the shipped toy pipeline (a tiny run: 2 images, 6 steps)."""

from __future__ import annotations

import csv

import numpy as np

from catpatch import CATConfig
from catpatch.cli.study import fidelity, run_study


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    a = rng.random((3, 32, 32, 3)).astype(np.float32)
    psnr, ssim = fidelity(a, a)
    assert np.isinf(psnr).all() and np.allclose(ssim, 1.0)
    noisy = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    psnr, ssim = fidelity(noisy, a)
    assert np.all((psnr > 20) & (psnr < 35)) and np.all(ssim < 0.99)
    mse = ((noisy.astype(np.float64) - a) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(psnr, 10 * np.log10(1 / mse), rtol=1e-6)


def test_tiny_study_run(tmp_path, recwarn):
    runs = [
        (6, "cat", CATConfig(warmup_steps=3, num_clusters=8)),
        (6, "step", CATConfig(warmup_steps=3, selection="step")),
    ]
    rows = run_study(tmp_path, images=2, batch_size=2, runs=runs, log=lambda *_: None)
    assert [r.method for r in rows] == ["unpatched", "cat", "step"]
    base, cat, step = rows
    assert base.macs_ratio == 1.0 and base.latent_error == 0.0
    assert 0.5 < cat.macs_ratio < 1.0 and abs(step.macs_ratio - cat.macs_ratio) < 0.1
    assert 5 < cat.psnr < 100 and 0 < cat.ssim < 1 and cat.latent_error > 0
    for name in ("study.csv", "study.md", "study.png", "study.json"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "study.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert "| 6 | cat | 0.3 | 3 | 8 |" in (tmp_path / "study.md").read_text()
    assert not [w for w in recwarn if "No artists" in str(w.message)], "plot without a legend"

    # A second run in the same folder resumes: nothing is generated again, the rows are the same.
    logged = []
    again = run_study(tmp_path, images=2, batch_size=2, runs=runs, log=logged.append)
    assert [r.psnr for r in again] == [r.psnr for r in rows]
    assert not any("PSNR" in line for line in logged)
