"""The frontier study's report and its rule for a budget default, on hand-made rows where each
rule decides the outcome (`catpatch.cli.study.frontier_report`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from catpatch.cli.study.frontier_report import (
    decide_budget,
    default_slope,
    paired,
    pick,
    settings_table,
    verdict,
)

IMAGES, TUNE = 8, 4


def row(method, setting, macs, psnr_each, steps=28, images=IMAGES, key=None):
    psnr_each = list(map(float, psnr_each))
    return dict(
        key=key or f"{steps} {images} {method} {setting}",
        steps=steps, images=images, method=method, setting=setting, macs=macs,
        psnr=float(np.mean(psnr_each)), psnr_min=min(psnr_each), ssim=1.0, accuracy=1.0,
        psnr_each=psnr_each,
    )  # fmt: skip


def tuned(method, setting, macs, tune_psnr, final_psnr, steps=28):
    """A tuning row (first captions) and the final row of the same setting."""
    return [
        row(method, setting, macs, [tune_psnr] * TUNE, steps, TUNE),
        row(method, setting, macs, final_psnr, steps),
    ]


def test_pick_takes_the_best_tuning_psnr_within_the_budget_plus_slack():
    rows = [
        *tuned("step", "a", 0.30, 30.0, [20] * IMAGES),  # best tuning PSNR within 0.3
        *tuned("step", "b", 0.305, 25.0, [40] * IMAGES),  # better final, worse tuning
        *tuned("step", "c", 0.32, 50.0, [50] * IMAGES),  # over 0.3 + 0.01
    ]
    assert pick(rows, 28, IMAGES, "step", 0.3)["setting"] == "a"
    assert pick(rows, 28, IMAGES, "step", 0.31)["setting"] == "c"
    assert pick(rows, 28, IMAGES, "step", 0.2) is None
    assert pick(rows, 50, IMAGES, "step", 0.3) is None


def test_pick_finds_the_planned_run_of_each_budget():
    rows = [row("planned", "macs 0.3 forecast auto", 0.29, [30] * 8),
            row("planned", "macs 0.4 forecast auto", 0.39, [35] * 8)]  # fmt: skip
    assert pick(rows, 28, IMAGES, "planned", 0.4)["macs"] == 0.39
    assert pick(rows, 28, IMAGES, "planned", 0.5) is None


def test_paired_difference_and_its_standard_error():
    a = row("planned", "x", 0.3, [31, 32, 33, 34])
    b = row("step", "y", 0.3, [30, 30, 30, 30])
    mean, se = paired(a, b)
    diff = np.array([1, 2, 3, 4.0])
    assert mean == pytest.approx(2.5)
    assert se == pytest.approx(diff.std(ddof=1) / math.sqrt(4))


@pytest.mark.parametrize(
    "planned, peer, expected",
    [
        ([32, 33, 32, 33], [30, 31, 30, 31], "**met**"),  # 2 dB ahead, tight
        ([30.5, 31.5, 30.5, 31.5], [30, 31, 30, 31], "under 1 dB"),  # ahead by 0.5 only
        ([40, 31, 45, 31], [30, 31, 30, 31], "under 1 dB / 2 SE"),  # 6 dB but noisy
        ([34, 34, 34, 29], [30, 31, 30, 31], "worse worst image"),  # 29 < 30
    ],
)
def test_verdict_needs_a_dB_two_errors_and_no_worse_worst_image(planned, peer, expected):
    text = verdict(row("planned", "x", 0.3, planned), row("step", "y", 0.3, peer))
    assert expected in text
    assert ("met**" in text) == (expected == "**met**")


def test_verdict_needs_a_worst_image_no_worse_than_any_chosen_peer():
    planned = row("planned", "x", 0.3, [34, 35, 34, 35])
    best = row("step", "y", 0.3, [30, 31, 30, 31])  # best mean, worst image 30
    other = row("taylorseer-lite", "z", 0.3, [33.5, 33.5, 20, 20])  # worst image 20
    assert verdict(planned, best, [other]) == "**met**"
    sturdy = row("magcache", "w", 0.3, [34.5, 34.5, 34.5, 20])  # lower mean, worst 20
    sturdier = row("firstblock", "v", 0.3, [34.2, 34.2, 34.2, 34.2])  # worst 34.2 > 34
    assert verdict(planned, best, [sturdy]) == "**met**"
    assert "worse worst image" in verdict(planned, best, [sturdy, sturdier])


def _default_curve(steps, points):
    """Tuning rows of 0.3.0's default curve (t0 8, order 1) at α 0.2 / 0.3 / 0.5."""
    return [
        row("step", f"step alpha {a:g} warm-up 8 order 1", macs, [p] * TUNE, steps, TUNE)
        for a, (macs, p) in zip((0.2, 0.3, 0.5), points, strict=False)
    ]


def test_default_slope_is_the_steepest_segment():
    rows = _default_curve(28, [(0.4, 40.0), (0.5, 55.0), (0.6, 60.0)])
    assert default_slope(rows, 28) == pytest.approx(150.0)  # (55 - 40) / 0.1, not the last 50
    assert default_slope(rows, 50) == 0.0  # no curve at 50 steps


def _study(planned_each, planned_macs, default_each, default_macs, curve):
    rows = _default_curve(28, curve)
    rows.append(row("default-0.3.0", "default", default_macs, default_each))
    rows.append(row("planned", "macs 0.5 forecast auto", planned_macs, planned_each))
    return rows


def test_a_budget_wins_at_fewer_macs_when_two_errors_ahead():
    ahead = _study([41, 42, 41, 42, 41, 42, 41, 42], 0.5, [40] * 8, 0.536,
                   [(0.5, 39.0), (0.536, 40.0), (0.68, 50.0)])  # fmt: skip
    chosen, lines = decide_budget({"m": ahead}, steps_list=(28,), budgets=(0.5,))
    assert chosen == 0.5 and any("| win |" in line for line in lines)


def test_a_win_needs_two_standard_errors():
    """1.5 SE ahead at fewer MACs is no win."""
    default = [40.0] * 8
    planned = [40.0 + d for d in (-0.3, 1.3) * 4]  # 0.5 dB ahead, 1.65 SE
    mean, se = paired(row("p", "x", 0.5, planned), row("d", "y", 0.5, default))
    assert 1.0 * se < mean < 2.0 * se  # the case the rule must refuse
    study = _study(planned, 0.5, default, 0.536, [(0.5, 39.0), (0.536, 40.0)])
    assert decide_budget({"m": study}, steps_list=(28,), budgets=(0.5,))[0] is None


def test_extra_macs_are_priced_on_the_defaults_curve():
    """1.5 dB ahead at 0.04 more MACs than a default whose curve buys 50 dB per unit (2 dB
    for 0.04): no win; the same lead at equal MACs wins."""
    curve = [(0.36, 38.0), (0.46, 43.0), (0.60, 50.0)]  # steepest 50 dB per unit
    planned = [41.4, 41.6] * 4
    costlier = _study(planned, 0.5, [40] * 8, 0.46, curve)
    chosen, lines = decide_budget({"m": costlier}, steps_list=(28,), budgets=(0.5,))
    assert chosen is None and any("2.00 | no win |" in line for line in lines)
    level = _study(planned, 0.46, [40] * 8, 0.46, curve)
    assert decide_budget({"m": level}, steps_list=(28,), budgets=(0.5,))[0] == 0.5


def test_a_budget_must_win_every_group_and_a_missing_group_is_no_win():
    win = _study([42] * 7 + [41], 0.5, [40] * 8, 0.536, [(0.5, 39.0), (0.536, 40.0)])
    loss = _study([39] * 7 + [38], 0.5, [40] * 8, 0.536, [(0.5, 39.0), (0.536, 40.0)])
    assert decide_budget({"a": win}, (28,), (0.5,))[0] == 0.5
    assert decide_budget({"a": win, "b": loss}, (28,), (0.5,))[0] is None
    assert decide_budget({"a": win}, (28, 50), (0.5,))[0] is None  # 50 steps not run


def test_settings_table_shows_planned_and_best_tuned_with_worst_images():
    rows = [row("planned", "macs 0.3 forecast auto", 0.29, [30, 32, 34, 36, 30, 32, 34, 36]),
            *tuned("taylorseer-lite", "lite", 0.3, 25.0, [20, 22, 24, 26, 20, 22, 24, 26])]
    table = settings_table({"toy": rows}, steps_list=(28,), budgets=(0.3,))
    assert "| 0.3 | 3.33x | **33.0** (30.0) / 23.0 (20.0) |" in table
