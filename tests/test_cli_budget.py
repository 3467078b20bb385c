"""The budget knob on the command line (`--macs B`, `--forecast`, `--calibration`) of `catpatch
generate`, `demo`, `bench` and `study`: each run stays within its budget and says so; bad
budgets and mixed knobs are one-line errors that name the fix (exit status 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catpatch.calibration import CALIBRATION_FILE
from catpatch.cli import build_parser, main

TOY_CALIBRATION = Path(__file__).resolve().parents[1] / "catpatch/toy/weights" / CALIBRATION_FILE
SLACK = 0.01  # a run's MACs ratio may exceed its budget by at most this


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert lines[0].startswith("catpatch ") and ": error: " in lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["generate", "demo", "bench", "study"])
def test_every_command_documents_the_budget(command):
    (sub,) = [a for a in build_parser()._actions if hasattr(a, "choices") and a.choices]
    text = " ".join(sub.choices[command].format_help().split())
    assert "--macs B" in text and "--forecast {auto,fit,reuse,taylor1,taylor2}" in text
    assert "--calibration PATH" in text and "(default: auto)" in text


def test_generate_within_the_budget_records_it(tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["generate", "--model", "toy", "--prompt", "a red circle", "--out", str(out),
            "--steps", "10", "--macs", "0.4", "--forecast", "reuse", "--calibration",
            str(TOY_CALIBRATION), "--no-progress"]  # fmt: skip
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "planned steps (MACs 0.4)" in printed and "budget 0.4" in printed
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    settings = record["settings"]
    assert settings["macs"] == 0.4 and settings["forecast"] == "reuse"
    assert settings["policy"] == "planned steps (MACs 0.4)"
    assert settings["calibration"] == str(TOY_CALIBRATION)
    # the manual knobs do not apply to a budgeted run: none is recorded as if it did
    assert settings["keep_ratio"] is settings["warmup_steps"] is settings["selection"] is None
    assert record["cat"]["macs_ratio"] <= 0.4 + SLACK
    assert record["cat"]["computed_steps"].startswith("1")  # the first step always runs

    # `catpatch eval` names the budgeted run's policy
    base = tmp_path / "base"
    assert run_cli([*argv[:6], str(base), "--steps", "10", "--no-cat", "--no-progress"]) == 0
    capsys.readouterr()
    assert run_cli(["eval", "--reference", str(base), "--candidate", str(out)]) == 0
    assert "candidate: planned steps (MACs 0.4) (--macs 0.4): MACs ratio" in capsys.readouterr().out

    # a resumed run must ask for the same budget
    assert run_cli([*argv[:-7], "--macs", "0.5", "--no-progress"]) == 2
    assert "macs=0.4" in one_error_line(capsys)


def test_demo_names_the_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--macs", "0.4", "--steps", "10", "--repeats", "0", "--no-progress",
            "--prompt", "a red circle", "--out", str(out)]  # fmt: skip
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "budget 0.4" in printed and "with planned steps (MACs 0.4)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["macs"] == 0.4 and summary["policy"] == "planned steps (MACs 0.4)"
    assert summary["config"]["macs"] == 0.4 and summary["selection"] is None
    assert summary["macs_ratio"] <= 0.4 + SLACK and summary["computed_steps"]
    assert summary["files"] == ["compare.png"]  # no token or cluster pictures


def test_bench_bound_is_the_budgeted_runs_macs(capsys):
    argv = ["bench", "--shape", "tiny-sd3", "--size", "128x128", "--steps", "10", "--repeats",
            "1", "--text-tokens", "16", "--device", "cpu", "--macs", "0.3"]  # fmt: skip
    assert run_cli([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["settings"]["macs"] == 0.3 and result["policy"] == "planned steps (MACs 0.3)"
    assert result["macs_ratio"] <= 0.3 + SLACK
    assert result["bound"] == pytest.approx(1 / result["macs_ratio"])
    assert result["steps_pruned"] == 0 and result["steps_full"] + result["steps_skipped"] == 10
    assert result["steps_full"] == len(result["computed_steps"].replace("-", ",").split(","))
    # a random-weight shape has no calibration: one warning line says so, no Python warning
    calibration = [line for line in captured.err.splitlines() if "no calibration" in line]
    assert len(calibration) == 1 and calibration[0].startswith("catpatch bench: warning: ")
    assert "UserWarning" not in captured.err

    assert run_cli([*argv, "--forecast", "taylor2"]) == 0
    table = capsys.readouterr().out
    assert "planned steps (MACs 0.3) (--macs 0.3, --forecast taylor2)" in table
    assert "(budget 0.3)" in table and "loop planned steps (MACs 0.3)" in table


def test_study_adds_the_planned_method(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "--quick", "--images", "1", "--macs", "0.4", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert run_cli(argv) == 0
    rows = json.loads((out / "study.json").read_text())
    planned = [r for r in rows if r["method"] == "planned"]
    assert len(planned) == 1 and planned[0]["steps"] == 28
    assert planned[0]["macs_ratio"] <= 0.4 + SLACK
    assert planned[0]["setting"] == "MACs budget 0.4, forecast auto"
    assert {r["method"] for r in rows} > {"unpatched", "cat", "step", "planned"}
    assert "| 28 | planned |" in (out / "study.md").read_text()
    targets = (out / "targets.md").read_text()
    assert "The budgeted policy (`--macs`) against step reuse" in targets
    assert "| 28 | MACs budget 0.4, forecast auto |" in targets
    assert "planned" in capsys.readouterr().out


BAD = [
    (["--macs", "0"], "--macs 0.0: must be in (0, 1]"),
    (["--macs", "-0.2"], "--macs -0.2: must be in (0, 1]"),
    (["--macs", "1.5"], "--macs 1.5: must be in (0, 1]"),
    (["--macs", "nan"], "--macs nan: must be in (0, 1]"),
    (["--macs", "lots"], "must be a number in (0, 1], e.g. 0.4"),
    (["--macs", "0.4", "--keep-ratio", "0.2"], "drop --keep-ratio, or drop --macs"),
    (["--macs", "0.4", "--warmup-steps", "3"], "drop --warmup-steps, or drop --macs"),
    (["--macs", "0.4", "--selection", "cat"], "drop --selection, or drop --macs"),
    (["--macs", "0.4", "--num-clusters", "8"], "drop --num-clusters, or drop --macs"),
    # with a manual knob there is no budget (the default one is only for no knob at all)
    (["--keep-ratio", "0.3", "--forecast", "fit"], "--forecast fit: only with --macs"),
    (["--keep-ratio", "0.3", "--calibration", "x.safetensors"],
     "add --macs B, e.g. --macs 0.4, or drop --calibration"),
    (["--macs", "0.4", "--calibration", "nope.safetensors"], "--calibration nope.safetensors: "
     "no such file"),
    (["--macs", "0.4", "--forecast", "guess"], "invalid choice: 'guess'"),
    (["--macs", "0.05", "--steps", "10"], "--macs 0.05 at 10 steps leaves 0 computed steps; the "
     "planner needs at least 2"),
    (["--macs", "0.05", "--steps", "10"], "use --macs 0.2 or more, or more --steps"),
]  # fmt: skip
COMMANDS = {
    "generate": ["generate", "--model", "toy", "--prompt", "a", "--out", "runs/x"],
    "demo": ["demo", "--out", "runs/x"],
    "bench": ["bench"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("options, message", BAD)
def test_bad_budgets_are_one_line_exit_2(command, options, message, tmp_path, monkeypatch,
                                         capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert run_cli([*COMMANDS[command], *options]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"catpatch {command}") and message in line, line
    assert not list(tmp_path.iterdir()), "a failed run left files or folders behind"


@pytest.mark.parametrize("options, message", [
    (["--macs", "0.05"], "--macs 0.05 at 28 steps leaves 1 computed step; "),
    (["--macs", "0.05"], "use --macs 0.072 or more"),
    (["--macs", "2"], "--macs 2.0: must be in (0, 1]"),
    (["--forecast", "reuse"], "--forecast reuse: only with --macs"),
])  # fmt: skip
def test_study_bad_budgets(options, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["study", "--out", "runs/x", *options]) == 2
    line = one_error_line(capsys)
    assert line.startswith("catpatch study: error: ") and message in line, line
    assert "--steps" not in line  # the study has no --steps to raise
    assert not list(tmp_path.iterdir())


def test_no_budget_with_the_unpatched_baseline(tmp_path, capsys):
    argv = ["generate", "--model", "toy", "--prompt", "a", "--out", str(tmp_path / "x"),
            "--no-cat", "--macs", "0.4"]  # fmt: skip
    assert run_cli(argv) == 2
    assert "--macs 0.4 with --no-cat" in one_error_line(capsys)


def test_a_file_that_is_no_calibration(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a calibration")
    assert run_cli(["bench", "--macs", "0.4", "--calibration", str(bad)]) == 2
    assert f"--calibration {bad}: not a catpatch calibration" in one_error_line(capsys)


def test_budget_too_small_when_the_run_starts_is_one_line(tmp_path, monkeypatch, capsys):
    """The planner's own error (raised at the run's first step) reads as the command line's,
    in one line, should a run start that the early check let through."""
    from catpatch.cli import budget

    monkeypatch.setattr(budget, "check_budget_steps", lambda *args, **kwargs: None)
    argv = ["demo", "--macs", "0.05", "--steps", "10", "--repeats", "0", "--no-progress",
            "--prompt", "a", "--out", str(tmp_path / "demo")]  # fmt: skip
    assert run_cli(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith("catpatch demo: error: --macs 0.05 at 10 steps leaves 0"), line
    assert "use --macs 0.2 or more, or more --steps" in line
    assert not (tmp_path / "demo").exists()
