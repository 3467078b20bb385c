"""The command line as a newcomer meets it: help, bad input, `--model toy`, the demo, warm
timings, quiet runs, the examples and the set-up (issue #11)."""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from catpatch.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SMALL_DEMO = ["--steps", "6", "--warmup-steps", "3"]
PROMPTS = ["a large red circle at the top left on a striped blue background",
           "a large blue square at the left on a checkered green background"]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    """`catpatch ...` in this process; the exit status (argparse errors exit)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


# ---- item 8: every option of every command has help that gives its default -----------------------
def test_every_option_has_help_with_its_default():
    from catpatch.trained.cli import build_parser as toy_parser

    parsers = {f"catpatch {n}": p for n, p in subcommands(build_parser()).items()}
    parsers |= {f"python -m catpatch.toy {n}": p for n, p in subcommands(toy_parser()).items()}
    assert {"catpatch demo", "catpatch generate", "catpatch eval", "catpatch bench",
            "catpatch study"} <= set(parsers)  # fmt: skip
    missing = []
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action) if action.help else ""
            if "default" not in text and "required" not in text:
                missing.append(f"{name} {'/'.join(action.option_strings)}: {text!r}")
    assert not missing, "\n".join(missing)
    assert "(default: 28)" in parsers["catpatch bench"].format_help()


# ---- item 2: bad input is one line naming the fix, exit status 2, nothing left behind ------------
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
BAD_INPUT = [
    (["bench", "--size", "1000x1000"], "multiples of 16 for SD3"),
    (["bench", "--size", "250x250"], "e.g. --size 256x256"),
    (["bench", "--keep-ratio", "1.5"], "--keep-ratio 1.5: must be in (0, 1]"),
    (["bench", "--steps", "5", "--warmup-steps", "8"],
     "--steps 5 must be more than --warmup-steps 8"),
    (["bench", "--num-clusters", "2000", "--size", "256", "--selection", "cat"],
     "exceeds the 256 image tokens"),
    (["bench", "--size", "99999x99999"], "at most 4096 pixels per side"),
    (["bench", "--size", "99999x99999"], "e.g. --size 4096x4096"),
    # a cluster option with a policy that makes no clusters: an error naming both fixes
    (["bench", "--num-clusters", "8"], "--selection step (step reuse) makes no clusters"),
    (["bench", "--num-clusters", "8", "--selection", "random"], "add --selection cat"),
    (["generate", "--model", "toy", "--prompt", "a", "--out", "runs/x", "--num-clusters", "8"],
     "drop --num-clusters, or add --selection cat"),
    (["demo", "--num-clusters", "8", "--out", "runs/x"], "--num-clusters 8: --selection step"),
    (["demo", "--size", "7x7", "--out", "runs/x"], "(see `catpatch demo --help`)"),
    (["bench", "--model", "no/such-model"], "--model no/such-model: not in the local Hugging"),
    (["bench", "--model", "toy", "--size", "512"], "at most 256 pixels per side"),
    (["bench", "--steps", "x"], "invalid int value: 'x'"),
    (["bench", "--repeats", "0"], "--repeats: must be >= 1"),
    pytest.param(["bench", "--device", "cuda"], "use --device cpu", marks=NO_CUDA),
    (["generate", "--model", "toy", "--prompt", "a", "--out", "runs/x", "--size", "1000x1000"],
     "e.g. --size 64x64"),
    (["generate", "--model", "toy", "--prompt", "a", "--out", "runs/x", "--size", "30"],
     "multiples of 4"),
    (["generate", "--model", "toy", "--prompt", "a", "--out", "runs/x", "--keep-ratio", "1.5"],
     "--keep-ratio 1.5: must be in (0, 1]"),
    (["generate", "--model", "./nope", "--prompt", "a", "--out", "runs/x"], "does not exist"),
    (["generate", "--model", "toy", "--prompt", "a", "--out", "runs/x", "--steps", "0"],
     "--steps: must be >= 1"),
    pytest.param(["generate", "--model", "toy", "--prompt", "a", "--out", "runs/x", "--device",
                  "cuda"], "install a CUDA build of torch", marks=NO_CUDA),
    (["demo", "--keep-ratio", "1.5", "--out", "runs/x"], "--keep-ratio 1.5"),
    (["demo", "--warmup-steps", "1", "--out", "runs/x"], "--warmup-steps 1: must be >= 2"),
    (["demo", "--model", "./nope", "--out", "runs/x"], "does not exist"),
    pytest.param(["demo", "--device", "cuda", "--out", "runs/x"], "use --device cpu",
                 marks=NO_CUDA),
    (["study", "--images", "0", "--out", "runs/x"], "--images: must be >= 1"),
    (["study", "--model", "nope", "--out", "runs/x"], "python -m catpatch.toy train"),
    (["eval", "--reference", "runs/a", "--candidate", "runs/b"], "--reference runs/a: no such"),
    ([], "required: COMMAND"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(argv, message, tmp_path, monkeypatch,
                                                         capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert run_cli(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("catpatch") and "error:" in lines[0] and message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not list(tmp_path.iterdir()), "a failed run left files or folders behind"


# ---- items 1, 3, 4, 7, 10: the demo end to end ---------------------------------------------------
def test_demo_times_warm_runs_only_and_draws_explained_pictures(tmp_path, monkeypatch):
    """The timed runs come after one warm-up run of each side: with a fake clock in which a
    first (cold) call costs 100 s and every later one 1 s, every timing is 1 s."""
    from diffusers import StableDiffusion3Pipeline

    from catpatch import CATConfig, is_patched
    from catpatch.cli import demo

    clock = [0.0]
    calls = []
    original = StableDiffusion3Pipeline.__call__

    def call(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        side = "cat" if is_patched(self) else "base"
        clock[0] += 1.0 if side in calls else 100.0
        calls.append(side)
        return out

    monkeypatch.setattr(StableDiffusion3Pipeline, "__call__", call)
    monkeypatch.setattr(demo, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    config = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=3, num_clusters=8)
    summary = demo.run_demo(tmp_path / "d", prompts=PROMPTS, config=config, repeats=2,
                            num_inference_steps=6)  # fmt: skip
    assert calls == ["base", "cat", "base", "cat", "cat", "base"], "pictures, then alternating"
    timing = summary["timing"]
    assert timing["unpatched_s"] == timing["patched_s"] == [1.0, 1.0] and timing["warm_runs"] == 2
    assert "median_patched_s" in timing and not any("cat" in key for key in timing)
    assert timing["speedup"] == 1.0 and "warm" in timing["how"] and timing["plausible"]
    saved = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert saved["timing"] == timing and "speedup_this_run" not in saved
    assert saved["seeds"] == [0, 1] and saved["prompts"] == PROMPTS
    # the policy that ran, by name and in full (selection included)
    assert (saved["selection"], saved["policy"]) == ("cat", "CAT")
    assert saved["config"]["selection"] == "cat" and saved["config"]["num_clusters"] == 8
    assert saved["files"] == ["compare.png", "tokens.png", "tokens.gif", "clusters.png"]
    # The pictures carry their titles, headings, legend and caption around the tiles.
    compare = np.asarray(Image.open(tmp_path / "d" / "compare.png").convert("L"))
    assert compare.shape[1] >= 3 * 256 and compare.shape[0] > 2 * 256 + 100
    tokens = Image.open(tmp_path / "d" / "tokens.png")
    assert tokens.height > 2 * 128 + 60, "step headings, legend and caption"
    gif = Image.open(tmp_path / "d" / "tokens.gif")
    assert gif.n_frames == 3, "one frame per pruned step (6 steps, 3 warm-up)"

    no_timing = demo.run_demo(tmp_path / "e", prompts=PROMPTS[:1], config=config, repeats=0,
                              num_inference_steps=6)  # fmt: skip
    assert "timing" not in no_timing


def test_demo_command_model_toy_is_quiet(tmp_path):
    """`catpatch demo --model toy` in a fresh process: no warnings, no notices, no bars with
    --no-progress: stderr stays empty; stdout gives the savings and the warm timing."""
    command = [sys.executable, "-m", "catpatch", "demo", "--model", "toy", "--out",
               str(tmp_path / "demo"), *SMALL_DEMO, "--repeats", "1", "--no-progress",
               "--prompt", PROMPTS[0]]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Only the warnings a disturbed timing gives (a busy machine; a speed-up above the bound)
    disturbed = (
        "catpatch demo: warning: this machine was busy before timing began",
        "catpatch demo: warning: the measured",
    )
    assert all(line.startswith(disturbed) for line in done.stderr.splitlines()), done.stderr
    # The default policy (step reuse): whole steps skipped, no token or cluster pictures.
    assert "2 skipped" in done.stdout and "selection='step'" in done.stdout
    # one timed run of each, more if the speed-up came out above the bound on a busy machine
    assert re.search(r"(1 run|median of \d+ runs) of each after a warm-up run", done.stdout)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "compare.png", "summary.json"]  # fmt: skip


def test_runs_no_longer_than_the_warm_up_warn_once(tmp_path, capsys):
    demo = ["demo", "--steps", "3", "--warmup-steps", "4", "--repeats", "0", "--no-progress",
            "--prompt", "a red circle", "--out", str(tmp_path / "demo")]  # fmt: skip
    assert run_cli(demo) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "catpatch demo: warning: --steps 3 is not more than --warmup-steps 4: every step runs "
        "the whole model, so catpatch saves nothing in this run (raise --steps or lower "
        "--warmup-steps)"
    ]
    generate = ["generate", "--model", "toy", "--prompt", "a red circle", "--steps", "2",
                "--warmup-steps", "2", "--no-progress", "--out", str(tmp_path / "g")]  # fmt: skip
    assert run_cli(generate) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("catpatch generate: warning: --steps 2 is not")


# ---- items 1, 3: `--model toy` in generate, eval's warm timing, bench, study ---------------------
def test_generate_model_toy_and_eval_times_warm_images_only(tmp_path, capsys):
    common = ["--model", "toy", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt",
              "a small green cross at the bottom on a dotted white background", "--steps", "5",
              "--warmup-steps", "2", "--num-clusters", "8", "--no-progress",
              "--selection", "cat"]  # fmt: skip
    assert run_cli(["generate", *common, "--out", str(tmp_path / "cat")]) == 0
    assert run_cli(["generate", *common, "--no-cat", "--out", str(tmp_path / "base")]) == 0
    assert capsys.readouterr().err == ""
    manifest = (tmp_path / "cat" / "manifest.jsonl").read_text()
    records = [json.loads(line) for line in manifest.splitlines()]
    assert [r["warm"] for r in records] == [False, True, True], "the first batch is cold"
    settings = records[0]["settings"]
    assert (settings["model"], settings["height"], settings["guidance"]) == ("toy", 64, 5.0)
    assert records[0]["cat"]["pruned_steps"] == 3
    assert Image.open(tmp_path / "cat" / "00000_000.png").size == (64, 64)

    evaluate = ["eval", "--reference", str(tmp_path / "base"), "--candidate",
                str(tmp_path / "cat"), "--json", str(tmp_path / "e.json")]  # fmt: skip
    assert run_cli(evaluate) == 0
    out = capsys.readouterr().out
    assert "time per image, warm batches only" in out and "(2 images)" in out
    saved = json.loads((tmp_path / "e.json").read_text())
    warm = [r["time_s"] for r in records if r["warm"]]
    assert saved["runs"]["candidate"]["time_s"] == pytest.approx(sum(warm) / 2)
    assert saved["runs"]["candidate"]["timed"] == 2


def test_bench_model_toy(capsys):
    bench = ["bench", "--model", "toy", "--size", "128", "--steps", "4", "--warmup-steps", "2",
             "--repeats", "1", "--text-tokens", "8", "--device", "cpu", "--json"]  # fmt: skip
    assert run_cli(bench) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 64 and result["settings"]["model"] == "toy"
    assert result["speedup"] > 0 and 0 < result["macs_ratio"] < 1


def test_bench_model_toy_default_size_is_its_own():
    from catpatch.cli.bench import default_size

    assert default_size("cpu-256x8", "toy") == (256, 256)  # 16x16 tokens, as the toy makes
    assert default_size("cpu-256x8", None) == (512, 512)


def test_study_takes_model_toy(tmp_path, monkeypatch):
    from catpatch.cli import study

    seen = {}

    def fake_run_study(out, **kwargs):
        seen.update(kwargs)
        Path(out).mkdir(parents=True)
        Path(out, "study.md").write_text("table\n")

    monkeypatch.setattr(study, "run_study", fake_run_study)
    assert run_cli(["study", "--model", "toy", "--out", str(tmp_path / "s"), "--quick"]) == 0
    assert seen["model"] == "toy" and seen["quick"] is True


# ---- item 9: every example runs end to end (small settings) --------------------------------------
@pytest.mark.parametrize(
    "script, argv",
    [
        ("quickstart.py", ["--steps", "6"]),
        ("quickstart.py", ["--steps", "5", "--warmup-steps", "2"]),
        ("own_loop.py", ["--steps", "6"]),
        ("gpu_checks.py", ["--device", "cpu", "--rows", "sync", "medium-step", "medium-eager",
                           "--shape",
                           "tiny-sd3", "--size", "128", "--steps", "5", "--warmup-steps", "2",
                           "--num-clusters", "4", "--text-tokens", "8", "--repeats", "1"]),
        ("lean_study.py", ["--images", "2", "--steps", "10", "--keep-ratios", "0.3"]),
        ("reuse_study.py", ["--images", "2", "--steps", "10"]),
        ("paper_study.py", ["--images", "2", "--steps", "10", "--keep-ratios", "0.3"]),
        ("error_split.py", ["--images", "2", "--steps", "10"]),
    ],
)  # fmt: skip
def test_examples_run(script, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    if script == "quickstart.py":
        assert sorted(p.name for p in (tmp_path / "out" / "quickstart").iterdir()) == [
            "base.png", "patched.png"]  # fmt: skip
        if "--warmup-steps" in argv:  # a manual knob: step reuse
            assert "2 skipped" in out and "step reuse" in out, out
        else:  # the default budget: 3 of 6 steps computed
            assert "CATConfig(macs=0.5)" in out and "3 computed" in out, out
    elif script == "own_loop.py":
        assert "2 pruned" in out
    elif script.endswith("_study.py"):
        name = {"paper_study.py": "paper-vs-cat.jsonl"}.get(script, script.replace("_", "-"))
        rows = (tmp_path / "out" / name.replace(".py", ".jsonl")).read_text()
        assert all(json.loads(r)["images"] == 2 for r in rows.splitlines())
    elif script == "error_split.py":
        lines = (tmp_path / "out/error-split.jsonl").read_text().splitlines()
        rows = [json.loads(r) for r in lines]
        assert [r["remaining"] for r in rows][:2] == ["abc", "bc"] and len(rows) == 8
        assert rows[-1]["latent_error"] < 1e-5, "both fresh: the unpatched run"
        assert (tmp_path / "out/error-split.md").read_text().count("\n| ") == 9
    else:
        rows = [json.loads(x) for x in (tmp_path / "out/gpu/results.jsonl").read_text().split("\n")
                if x]  # fmt: skip
        assert [r["row"] for r in rows] == ["sync", "medium-step", "medium-eager"]
        assert all("error" not in r and r["speedup"] > 0 for r in rows[1:])
        step, cat = rows[1]["settings"]["selection"], rows[2]["settings"]["selection"]
        assert (step, cat) == ("step", "cat") and rows[1]["steps_skipped"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["out"]), "outputs under out/"


# ---- items 6, 7: set-up --------------------------------------------------------------------------
def test_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["build-system"]["requires"] == ["setuptools>=77"]


def fake_venv(folder: Path, has_torch: bool) -> Path:
    """A venv whose python answers `import torch` as told and whose pip logs its arguments."""
    bin_ = folder / "bin"
    bin_.mkdir(parents=True)
    log = folder / "pip.log"
    (bin_ / "python").write_text(
        f"#!/bin/sh\ncase \"$*\" in *torch.__version__*) echo 2.13.0;; *'import torch'*) "
        f"exit {0 if has_torch else 1};; esac\n"
    )
    (bin_ / "pip").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    for tool in ("python", "pip"):
        (bin_ / tool).chmod(0o755)
    return log


@pytest.mark.parametrize(
    "has_torch, extra, installs_torch",
    [
        (True, [], False),  # an existing venv with torch: keep it
        (False, [], True),  # none yet: the default requirement
        (False, ["TORCH="], False),  # TORCH= : never install torch
        (True, ["TORCH=torch==2.13.0"], True),  # asked for on the command line
        (False, ["TORCH_INDEX=https://download.pytorch.org/whl/cpu"], True),
        (True, ["TORCH_INDEX=https://download.pytorch.org/whl/cpu"], True),  # asked for
    ],
)
def test_make_setup_keeps_an_installed_torch(has_torch, extra, installs_torch, tmp_path):
    log = fake_venv(tmp_path / "venv", has_torch)
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "setup", f"VENV={tmp_path / 'venv'}",
                           *extra], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    torch_calls = [c for c in calls if "torch" in c]
    assert bool(torch_calls) == installs_torch, calls
    if installs_torch and extra and extra[0].startswith("TORCH_INDEX"):
        assert torch_calls == ["install -q torch==2.13.0 --index-url "
                               "https://download.pytorch.org/whl/cpu"]  # fmt: skip
    assert calls[-1] == "install -q -e .[test]"
