"""The frontier study's runs (`catpatch.cli.study.frontier_runs`): the sweep grids, the row
keys, and a tiny resumable study on the toy model with shrunken grids, whose adaptive peers
(MagCache, FirstBlockCache) are measured over the whole run and whose "final" stage runs the
best tuned setting within each budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from catpatch.cli.study import frontier_runs
from catpatch.cli.study.frontier_report import NAMES, write_report
from catpatch.cli.study.frontier_runs import SLACK, TUNED, key_of, run_frontier, sweep_settings
from catpatch.cli.study.runs import fidelity
from catpatch.config import CATConfig
from catpatch.peers.firstblock import FirstBlockCache
from catpatch.peers.magcache import MagCache

STEPS, IMAGES, TUNE = 6, 3, 2
BUDGETS = (0.5, 1.0)
SKIPPING, NOT_SKIPPING = 10.0, 0.0  # FirstBlockCache thresholds: skips all it may, nothing
SMALL_EXCLUDES = {"taylorseer", "cat"}  # small=2 leaves out TaylorSeer attention and CAT


def _shrink(mp: pytest.MonkeyPatch) -> None:
    """Grids of one or two values: every small level a subset of the full (small=0) grid."""
    grid = ((3,), (0.3,), (2,), (3,))
    mp.setattr(frontier_runs, "GRIDS", {0: (*grid, True), 1: (*grid, True), 2: (*grid, False)})
    magcache = ((0.5, 1.0), (3,), (0.2,))
    mp.setattr(frontier_runs, "MAGCACHE_GRID", magcache)
    mp.setattr(frontier_runs, "MAGCACHE_SMALL", magcache)
    mp.setattr(frontier_runs, "FIRSTBLOCK_THRESHOLDS", (NOT_SKIPPING, SKIPPING))


def _run(out):
    return run_frontier(
        out, "toy", steps_list=(STEPS,), images=IMAGES, tune=TUNE, budgets=BUDGETS, small=2,
        methods=("planned",), log=lambda line: None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny study (sweep, planned, final) on the toy: (out folder, returned rows)."""
    out = tmp_path_factory.mktemp("frontier")
    with pytest.MonkeyPatch.context() as mp:  # only while it runs: other tests see the grids
        _shrink(mp)
        rows = _run(out)
    return out, rows


def _file_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line]


# --- sweep_settings ---------------------------------------------------------------------


@pytest.mark.parametrize("steps", [20, 28, 50])
def test_sweep_lists_every_tuned_method_and_small_grids_are_subsets(steps):
    keys = {}
    for small in (0, 1, 2):
        runs = sweep_settings(steps, small)
        expected = set(TUNED) - (SMALL_EXCLUDES if small == 2 else set())
        assert {m for m, _ in runs} == expected, small
        keys[small] = [key_of(steps, m, s, 4) for m, s in runs]
        assert len(set(keys[small])) == len(keys[small]), f"small={small}: duplicate settings"
    # "final" looks the tuned setting up in the full grid: anything missing there is dropped
    assert set(keys[2]) <= set(keys[0]), sorted(set(keys[2]) - set(keys[0]))
    assert set(keys[1]) <= set(keys[0]), sorted(set(keys[1]) - set(keys[0]))


def test_sweep_magcache_settings_are_for_the_step_count():
    for small in (0, 2):
        for steps in (20, 50):
            mags = [s for m, s in sweep_settings(steps, small) if m == "magcache"]
            assert mags and all(isinstance(s, MagCache) for s in mags)
            assert all(s.num_inference_steps == steps and s.mag_ratios is None for s in mags)
            grid = frontier_runs.MAGCACHE_SMALL if small == 2 else frontier_runs.MAGCACHE_GRID
            assert len(mags) == math.prod(len(values) for values in grid)
    fbc = [s for m, s in sweep_settings(28) if m == "firstblock"]
    assert [s.threshold for s in fbc] == list(frontier_runs.FIRSTBLOCK_THRESHOLDS)


@pytest.mark.parametrize("steps", [5, 8, 9])
def test_sweep_leaves_out_warmups_of_steps_minus_one_or_more(steps):
    warmups, alphas, *_ = frontier_runs.GRIDS[0]
    runs = sweep_settings(steps)
    step_runs = [s for m, s in runs if m == "step"]
    cat_runs = [s for m, s in runs if m == "cat"]
    assert all(s.warmup_steps < steps - 1 for s in step_runs + cat_runs)
    kept = [t0 for t0 in warmups if t0 < steps - 1]
    assert len(step_runs) == len(kept) * len(alphas) * 2  # reuse orders 0 and 1
    assert {s.warmup_steps for s in step_runs} == set(kept)
    assert {s.warmup_steps for s in cat_runs} == {t0 for t0 in (4, 8) if t0 < steps - 1}
    assert len(kept) < len(warmups)  # the step counts above do leave some out


# --- key_of -----------------------------------------------------------------------------


def test_key_of_leaves_out_magcache_ratios():
    base = MagCache(0.06, 3, 0.2, 28)
    a = MagCache(0.06, 3, 0.2, 28, mag_ratios=[1.0] * 28)
    b = MagCache(0.06, 3, 0.2, 28, mag_ratios=[0.9] * 28)
    assert key_of(28, "magcache", a, 4) == key_of(28, "magcache", b, 4)
    assert key_of(28, "magcache", a, 4) == key_of(28, "magcache", base, 4)
    assert "mag_ratios" not in key_of(28, "magcache", a, 4)


def test_key_of_distinguishes_settings_steps_and_images():
    keys = [
        key_of(28, "magcache", MagCache(0.06, 3, 0.2, 28), 4),
        key_of(28, "magcache", MagCache(0.12, 3, 0.2, 28), 4),
        key_of(28, "magcache", MagCache(0.06, 6, 0.2, 28), 4),
        key_of(28, "magcache", MagCache(0.06, 3, 0.1, 28), 4),
        key_of(28, "magcache", MagCache(0.06, 3, 0.2, 28), 8),
        key_of(50, "magcache", MagCache(0.06, 3, 0.2, 50), 4),
        key_of(28, "firstblock", FirstBlockCache(0.05), 4),
        key_of(28, "firstblock", FirstBlockCache(0.1), 4),
        key_of(28, "step", CATConfig(keep_ratio=0.3, warmup_steps=8, reuse_order=0), 4),
        key_of(28, "step", CATConfig(keep_ratio=0.3, warmup_steps=8, reuse_order=1), 4),
    ]
    assert len(set(keys)) == len(keys)


# --- a tiny study on the toy -------------------------------------------------------------


def test_sweep_rows_are_on_the_tuning_captions(study, monkeypatch):
    out, rows = study
    _shrink(monkeypatch)
    by_key = {r["key"]: r for r in rows}
    sweep = sweep_settings(STEPS, 2)
    assert {"magcache", "firstblock"} <= {m for m, _ in sweep}
    for method, setting in sweep:
        row = by_key[key_of(STEPS, method, setting, TUNE)]
        assert row["images"] == TUNE == len(row["psnr_each"])
        assert row["method"] == method
    assert {r["images"] for r in rows} == {TUNE, IMAGES}
    assert len(_file_rows(out)) == len(rows)  # one line per row, no duplicates


def test_adaptive_peers_rows_have_whole_run_macs_and_psnr(study):
    _, rows = study
    for method in ("magcache", "firstblock"):
        mine = [r for r in rows if r["method"] == method]
        assert {r["images"] for r in mine} == {TUNE, IMAGES}, method
        for r in mine:
            assert 0 < r["macs"] <= 1.0 + 1e-6, r
            assert not any(math.isnan(v) for v in [r["psnr"], *r["psnr_each"]]), r
            assert len(r["psnr_each"]) == r["images"]
            if r["macs"] < 1 - 1e-6:  # it skipped something: not the unpatched images
                assert math.isfinite(r["psnr"]), r
    assert any(r["macs"] < 0.9 for r in rows if r["method"] == "magcache")


def test_firstblock_threshold_trades_macs_for_psnr(study):
    _, rows = study
    fbc = {
        (r["setting"], r["images"]): r for r in rows if r["method"] == "firstblock"
    }  # fmt: skip
    same = np.random.default_rng(0).random((2, 8, 8, 3))
    assert np.all(np.isinf(fidelity(same, same)[0]))  # identical images: PSNR inf
    for images in (TUNE, IMAGES):
        skipping = fbc[(f"threshold {SKIPPING:g}", images)]
        full = fbc[(f"threshold {NOT_SKIPPING:g}", images)]
        assert full["macs"] == pytest.approx(1.0, abs=1e-6)
        assert full["psnr"] > 60  # skips nothing: the unpatched images (inf on the CPU)
        assert skipping["macs"] < 1.0
        assert skipping["psnr"] < full["psnr"]
        assert math.isfinite(skipping["psnr"])


def test_resume_appends_no_rows_and_returns_the_same_rows(study, monkeypatch):
    out, rows = study
    _shrink(monkeypatch)
    before = (out / "rows.jsonl").read_text()
    again = _run(out)
    assert (out / "rows.jsonl").read_text() == before
    assert len(before.splitlines()) == len(rows)
    assert sorted(again, key=lambda r: r["key"]) == sorted(rows, key=lambda r: r["key"])


def test_final_runs_the_best_tuning_setting_within_each_budget(study):
    out, _ = study
    rows = _file_rows(out)
    tuning = [r for r in rows if r["images"] == TUNE]
    finals = [r for r in rows if r["images"] == IMAGES and r["method"] in TUNED]
    expected: set[tuple[str, str]] = set()
    chose_by_budget = False
    for method in TUNED:
        mine = [r for r in tuning if r["method"] == method]
        final_settings = {r["setting"] for r in finals if r["method"] == method}
        allowed = set()  # settings that are the best within some budget
        for budget in BUDGETS:
            fits = [r for r in mine if r["macs"] <= budget + SLACK]
            if not fits:
                continue
            best_psnr = max(r["psnr"] for r in fits)
            best = {r["setting"] for r in fits if r["psnr"] == best_psnr}
            assert best & final_settings, (method, budget, best, final_settings)
            allowed |= best
            chose_by_budget |= len(fits) < len(mine) and best_psnr < max(r["psnr"] for r in mine)
            expected.add((method, budget))
        assert final_settings <= allowed, (method, final_settings, allowed)
        for r in finals:
            if r["method"] == method:  # its tuning row fits at least the largest budget
                row = next(t for t in mine if t["setting"] == r["setting"])
                assert row["macs"] <= max(BUDGETS) + SLACK
    assert {"magcache", "firstblock"} <= {m for m, _ in expected}
    assert chose_by_budget  # some budget ruled out a method's best setting overall
    # the budget excluded FirstBlockCache's full run at 0.5: its skipping setting ran
    assert {r["setting"] for r in finals if r["method"] == "firstblock"} == {
        f"threshold {NOT_SKIPPING:g}",
        f"threshold {SKIPPING:g}",
    }


def test_report_names_the_adaptive_peers(study, tmp_path):
    out, _ = study
    text = write_report(out, "toy", steps_list=(STEPS,), images=IMAGES, budgets=BUDGETS)
    table = [line for line in text.read_text().splitlines() if line.startswith("| ")]
    for method in ("magcache", "firstblock"):
        assert any(f"| {NAMES[method]} |" in line for line in table), method
    assert "MagCache" in NAMES["magcache"] and "FirstBlockCache" in NAMES["firstblock"]
    # without their rows the tables leave them out (the prose still names them)
    (tmp_path / "rows.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in _file_rows(out)
            if r["method"] not in ("magcache", "firstblock")
        )
    )
    text = write_report(tmp_path, "toy", steps_list=(STEPS,), images=IMAGES, budgets=BUDGETS)
    table = [line for line in text.read_text().splitlines() if line.startswith("| ")]
    assert not any(NAMES["magcache"] in line or NAMES["firstblock"] in line for line in table)
