"""The quality study's machinery on the shipped toy pipeline (a tiny run: 2 images, 6 steps)."""

from __future__ import annotations

import csv

import numpy as np

from catpatch import CATConfig
from catpatch.cli.study import fidelity, frontier, run_study
from catpatch.peers.magcache import MagCache
from catpatch.peers.taylorseer import TaylorSeer


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
        (6, "cat", CATConfig(selection="cat", warmup_steps=3, num_clusters=8)),
        (6, "step", CATConfig(warmup_steps=3, selection="step")),
        (6, "taylorseer", TaylorSeer(cache_interval=2, warmup_steps=3)),
        (6, "magcache", MagCache(threshold=0.5, num_inference_steps=6)),
    ]
    rows = run_study(tmp_path, images=2, batch_size=2, runs=runs, log=lambda *_: None)
    assert [r.method for r in rows] == ["unpatched", "cat", "step", "taylorseer", "magcache"]
    base, cat, step, taylorseer, magcache = rows
    # MagCache calibrated by the study itself (on captions it does not score) skips steps.
    assert 0.3 < magcache.macs_ratio < 1.0 and 5 < magcache.psnr < 100
    assert (
        magcache.setting == "threshold 0.5"
        and "| 6 | magcache threshold 0.5 |" in (tmp_path / "targets.md").read_text()
    )
    assert 0.5 < taylorseer.macs_ratio < 1.0 and 5 < taylorseer.psnr < 100
    assert len(cat.psnr_each) == 2 and taylorseer.setting == "interval 2"
    targets = (tmp_path / "targets.md").read_text()
    assert "| 6 | taylorseer interval 2 |" in targets
    assert base.macs_ratio == 1.0 and base.latent_error == 0.0
    assert 0.5 < cat.macs_ratio < 1.0 and abs(step.macs_ratio - cat.macs_ratio) < 0.1
    assert 5 < cat.psnr < 100 and 0 < cat.ssim < 1 and cat.latent_error > 0
    for name in ("study.csv", "study.md", "study.png", "study.json"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "study.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert "| 6 | cat | 0.3 | 3 | 8 |" in (tmp_path / "study.md").read_text()
    assert not [w for w in recwarn if "No artists" in str(w.message)], "plot without a legend"

    # A second run in the same folder resumes: nothing is generated again, the rows are the same.
    logged = []
    again = run_study(tmp_path, images=2, batch_size=2, runs=runs, log=logged.append)
    assert [r.psnr for r in again] == [r.psnr for r in rows]
    assert not any("PSNR" in line for line in logged)


def test_frontier_keeps_what_nothing_cheaper_beats():
    from catpatch.cli.study import Row

    def row(macs, psnr):
        return Row(28, "cat", "", 0.3, 8, 20, macs, psnr, psnr, 1, 0, 1, 1, 0)

    rows = [row(0.5, 30), row(0.6, 29), row(0.4, 25), row(0.7, 33), row(0.5, 28)]
    assert [(r.macs_ratio, r.psnr) for r in frontier(rows)] == [(0.4, 25), (0.5, 30), (0.7, 33)]


def test_study_command_quick_end_to_end(tmp_path, capsys):
    """`catpatch study --quick` as a user runs it (the smallest image count it accepts): the
    unpatched reference and the five equal-MACs methods at 28 steps, α 0.3, on the toy."""
    from catpatch.cli import main

    out = tmp_path / "study"
    assert main(["study", "--quick", "--images", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    methods = ["unpatched", "cat", "random", "noise", "stale", "step"]
    assert [r["method"] for r in rows] == methods
    assert {(r["steps"], r["keep_ratio"]) for r in rows[1:]} == {("28", "0.3")}
    macs = {r["method"]: float(r["macs_ratio"]) for r in rows}
    assert macs["unpatched"] == 1.0 and 0.5 < macs["cat"] < 0.6  # T = 32 against L = 256
    assert all(abs(macs[m] - macs["cat"]) < 1e-3 for m in methods[1:5]), "not equal MACs"
    # step reuse computes whole steps: equal MACs to the nearest step (half a step is 1/56)
    assert abs(macs["step"] - macs["cat"]) <= 1 / 56 + 1e-6
    psnr = {r["method"]: float(r["psnr"]) for r in rows[1:]}
    assert all(15 < v < 80 for v in psnr.values()), psnr
    for name in ("study.csv", "study.md", "study.png", "study.json", "rows.jsonl"):
        assert (out / name).stat().st_size > 0
    assert "| 28 | cat | 0.3 | 8 | 20 |" in printed  # the table is printed
