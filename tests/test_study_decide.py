"""The study's record keys and run order, `--report` of an interrupted study, and the rule
that picks the defaults from the studies of both models (`catpatch.cli.study.decide`)."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np

from catpatch import CATConfig
from catpatch.cli.study import Row, configurations
from catpatch.cli.study.decide import CHEAPER_TIE, LOSS, MISSING, TIE, WIN, decide, outcomes
from catpatch.cli.study.methods import (
    COMBINED_METHODS,
    FIRST_METHODS,
    KEEP_RATIOS,
    STEP_METHODS,
    STEPS,
    TOKEN_METHODS,
)
from catpatch.cli.study.runs import _key


def test_every_method_spells_out_what_the_defaults_would_set():
    """The study decides the defaults, so a changed default must change none of its runs, and
    no record key may then answer for another method's configuration."""
    for method, spec in TOKEN_METHODS.items():
        assert {"selection", "lean", "token_order", "reuse_order"} <= set(spec), method
    for _, method, config in configurations():
        if isinstance(config, CATConfig):  # each decided field set by the method, not defaulted
            spec = {**TOKEN_METHODS, **STEP_METHODS, **COMBINED_METHODS}[method]
            assert all(getattr(config, k) == v for k, v in spec.items()), (method, config)
    keys = [_key(*run) for run in configurations()]
    assert len(keys) == len(set(keys))
    # Every field in the key, the default ones too: a changed default changes the key.
    cat = _key(28, "cat", CATConfig(keep_ratio=0.3, selection="cat"))
    assert cat.split()[1] == "cat" and "selection='cat'" in cat and "lean=True" in cat


def test_full_study_runs_the_comparisons_the_defaults_rest_on_first():
    runs = configurations()
    first = [(s, m, c.keep_ratio) for s, m, c in runs[: len(STEPS) * len(KEEP_RATIOS) * 4]]
    assert {m for _, m, _ in first} == set(FIRST_METHODS)
    assert {(s, k) for s, _, k in first} == {(s, k) for s in STEPS for k in KEEP_RATIOS}
    assert len(runs) == len({_key(*r) for r in runs}) == 99


def _row(steps, method, keep, psnr_each, macs=0.55):
    each = tuple(float(v) for v in psnr_each)
    return Row(steps, method, "", keep, 8, 20, macs, float(np.mean(each)), min(each), 0.99,
               0.1, 1.0, 1.0, 1.0, each)  # fmt: skip


def _study(offsets: dict[str, float], noise: float = 0.1, macs: dict[str, float] | None = None):
    """Rows for every candidate in every group: 40 dB + the method's offset, ± `noise` in
    turn over the images (the mean difference is the offset, its standard error not zero)."""
    rng = np.random.default_rng(0)
    rows = []
    for steps in STEPS:
        for keep in KEEP_RATIOS:
            base = 40 + rng.normal(0, 2, 16)  # images differ a lot; the pairing removes it
            for i, (method, offset) in enumerate(offsets.items()):
                each = base + offset + noise * (-1.0) ** (np.arange(16) + i)
                rows.append(_row(steps, method, keep, each, (macs or {}).get(method, 0.55)))
    return rows


def test_the_rule_accepts_only_a_method_ahead_in_every_group_of_every_model():
    winner = {"cat": 0, "stale": 1.0, "step": 3.0, "random": -2.0}
    toy, scenes = _study(winner), _study(winner)
    found = outcomes("toy", toy)
    assert {o.verdict for o in found["step"]} == {WIN} and {o.verdict for o in found["random"]} == {
        LOSS
    }
    assert {o.verdict for o in found["noise"]} == {MISSING}  # not run: never accepted
    default, report = decide({"toy": toy, "scenes": scenes})
    # step beats cat, then nothing beats step (stale was accepted against cat but loses to step)
    assert default == "step"
    assert "Accepted against `cat`: `step`, `stale`" in report
    assert "No method beats `step` by the rule: **`step`** stays." in report

    # One group on one model where step is behind: the rule keeps stale, not step.
    losing = [
        dataclasses.replace(r, psnr_each=tuple(v - 5 for v in r.psnr_each), psnr=r.psnr - 5)
        if (r.method, r.steps, r.keep_ratio) == ("step", 50, 0.5)
        else r
        for r in scenes
    ]
    assert decide({"toy": toy, "scenes": losing})[0] == "stale"


def test_a_win_at_more_macs_must_beat_what_they_buy_the_default():
    """Step reuse rounds to whole steps: ahead by 0.5 dB at 0.02 more MACs, where the default's
    own curve gains 50 dB per unit of MACs (1 dB for 0.02), is no win; ahead by 2 dB is."""
    from catpatch.cli.study.decide import COSTLIER

    def rows(ahead: float) -> list[Row]:
        found = []
        for steps in STEPS:
            for keep, macs, psnr in ((0.2, 0.45, 35.0), (0.3, 0.55, 40.0), (0.5, 0.65, 45.0)):
                base = psnr + 0.1 * (-1.0) ** np.arange(16)
                found.append(_row(steps, "cat", keep, base, macs))
                found.append(_row(steps, "step", keep, base[::-1] + ahead, macs + 0.02))
        return found

    assert {o.verdict for o in outcomes("toy", rows(0.5))["step"]} == {COSTLIER}
    assert decide({"toy": rows(0.5)})[0] == "cat"
    assert {o.verdict for o in outcomes("toy", rows(2.0))["step"]} == {WIN}
    assert decide({"toy": rows(2.0)})[0] == "step"


def test_psnr_table_gives_every_group_and_marks_what_did_not_run():
    from catpatch.cli.study.decide import psnr_table

    rows = _study({"cat": 0, "step": 3.0}, macs={"cat": 0.55, "step": 0.5})
    table = psnr_table({"toy": rows}, ("cat", "step", "stale")).splitlines()
    assert len(table) == 2 + len(STEPS) * len(KEEP_RATIOS)
    first = table[2].split(" | ")
    assert first[:4] == ["| toy", "28", "0.2", "0.550"]  # the first method's MACs
    cat, step = (float(cell.split()[0]) for cell in first[4:6])
    assert abs(step - cat - 3.0) < 1e-9 and first[6] == "- |"


def test_a_tie_counts_for_a_method_only_at_fewer_macs():
    tie = {"cat": 0, "stale": 0.0}
    default, _ = decide({"toy": _study(tie, macs={"stale": 0.55})})
    assert default == "cat"
    assert {o.verdict for o in outcomes("toy", _study(tie))["stale"]} == {TIE}
    cheaper = _study(tie, macs={"stale": 0.5})
    assert {o.verdict for o in outcomes("toy", cheaper)["stale"]} == {CHEAPER_TIE}
    assert decide({"toy": cheaper})[0] == "stale"


def test_report_writes_the_tables_of_an_interrupted_study(tmp_path, capsys):
    """`catpatch study --report` after a killed study: the finished rows' tables, nothing run."""
    from catpatch.cli import main
    from catpatch.cli.study import run_study

    runs = [
        (6, "cat", CATConfig(warmup_steps=3, num_clusters=8, selection="cat")),
        (6, "stale", CATConfig(warmup_steps=3, num_clusters=8, selection="stale")),
    ]
    out = tmp_path / "s"
    run_study(out, images=1, batch_size=1, runs=runs[:1], log=lambda *_: None)
    (out / "study.csv").unlink()
    rows_before = (out / "rows.jsonl").read_text()
    logged = []
    rows = run_study(out, images=1, runs=runs, log=logged.append, report=True)
    assert [r.method for r in rows] == ["unpatched", "cat"]
    assert (out / "rows.jsonl").read_text() == rows_before  # nothing generated
    with open(out / "study.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["unpatched", "cat"]
    assert not any("PSNR" in line for line in logged)
    record = json.loads(rows_before.splitlines()[0])
    assert record["key"].startswith("6 cat CATConfig(keep_ratio=0.3, warmup_steps=3")

    # No finished run at this image count: one line naming the fix, nothing written.
    assert main(["study", "--report", "--images", "3", "--out", str(out)]) == 2
    assert "without --report first" in capsys.readouterr().err


# ---- each part of the rule decides a hand-made study -------------------------------------------
# The default's curve at each step count: (α, MACs, PSNR). Its steepest segment gains 50 dB per
# unit of MACs (1 dB for 0.02 more), its last one 5: the two prices of extra MACs differ.
BENDING = ((0.2, 0.45, 35.0), (0.3, 0.55, 40.0), (0.5, 0.65, 40.5))


def _against_cat(method: str, ahead: float, se: float, extra_macs: float) -> list[Row]:
    """`cat` on the `BENDING` curve and `method` in every group, `ahead` dB better on average
    over 16 images with paired standard error `se`, at `extra_macs` more MACs (negative:
    fewer). The differences alternate ahead ± s, whose standard error is s·√(16/15)/4."""
    spread = 4 * se / np.sqrt(16 / 15)
    rows = []
    for steps in STEPS:
        for keep, macs, psnr in BENDING:
            base = psnr + np.linspace(-3, 3, 16)  # images differ; the pairing removes it
            diff = ahead + spread * (-1.0) ** np.arange(16)
            rows.append(_row(steps, "cat", keep, base, macs))
            rows.append(_row(steps, method, keep, base + diff, macs + extra_macs))
    return rows


def _verdicts(rows: list[Row], method: str) -> set[str]:
    return {o.verdict for o in outcomes("toy", rows)[method]}


def test_a_win_needs_two_standard_errors():
    """1.55 SE ahead at the same MACs is a tie (the default stays); 2.5 SE ahead is a win."""
    near = _against_cat("stale", ahead=0.155, se=0.1, extra_macs=0.0)
    found = outcomes("toy", near)["stale"]
    assert all(abs(o.difference / o.error - 1.55) < 1e-6 for o in found)  # as constructed
    assert _verdicts(near, "stale") == {TIE}
    assert decide({"toy": near})[0] == "cat"
    clear = _against_cat("stale", ahead=0.25, se=0.1, extra_macs=0.0)
    assert _verdicts(clear, "stale") == {WIN}
    assert decide({"toy": clear})[0] == "stale"


def test_fewer_macs_do_not_make_up_for_a_loss():
    """0.3 dB behind (6 SE) at 0.02 fewer MACs is a loss: fewer MACs only turn a tie into an
    acceptance; they never count as dB the method gains (the extra MACs are clamped at 0)."""
    rows = _against_cat("stale", ahead=-0.3, se=0.05, extra_macs=-0.02)
    assert _verdicts(rows, "stale") == {LOSS}
    assert decide({"toy": rows})[0] == "cat"


def test_extra_macs_are_priced_at_the_steepest_segment():
    """0.5 dB ahead (10 SE) at 0.02 more MACs: the steepest segment of the default's curve buys
    1 dB with them (no win); its last segment would buy only 0.1 dB (a win)."""
    from catpatch.cli.study.decide import COSTLIER

    rows = _against_cat("step", ahead=0.5, se=0.05, extra_macs=0.02)
    assert _verdicts(rows, "step") == {COSTLIER}
    assert decide({"toy": rows})[0] == "cat"
    # the same lead at the same MACs wins: the price alone decided
    assert decide({"toy": _against_cat("step", ahead=0.5, se=0.05, extra_macs=0.0)})[0] == "step"


def test_load_study_reads_the_largest_image_count(tmp_path):
    """A quick run (2 images) beside the full one (8) in the same folder: the full one's rows,
    whichever was written first."""
    from catpatch.cli.study.decide import load_study
    from catpatch.cli.study.rows import append_row

    path = tmp_path / "rows.jsonl"
    for images, psnr in ((2, 20.0), (8, 40.0), (2, 21.0)):
        for keep in KEEP_RATIOS:
            row = _row(28, "cat", keep, [psnr] * images)
            append_row(path, f"28 cat {keep} {psnr}", images, row)
    rows = load_study(tmp_path)
    assert len(rows) == len(KEEP_RATIOS)
    assert {r.psnr for r in rows} == {40.0} and {len(r.psnr_each) for r in rows} == {8}
