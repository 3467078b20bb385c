"""First contact, round two: one-line errors on every path a new user hit, timings that cannot
exceed what the arithmetic allows, and the small things around them (`--version`, closed pipes,
plain output when piped, PSNR per image, the quick study's outputs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import catpatch
from catpatch.cli import main
from catpatch.cli.timing import PairTiming, bound_note, impossible, runs_label, time_pair

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle at the top left on a striped blue background"
TOY_GENERATE = ["generate", "--model", "toy", "--prompt", PROMPT, "--steps", "3",
                "--warmup-steps", "2", "--no-progress"]  # fmt: skip
SMALL_DEMO = ["demo", "--steps", "4", "--warmup-steps", "2", "--repeats", "0",
              "--no-progress", "--prompt", PROMPT]  # fmt: skip
NO_PROC = pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), **extra}  # fmt: skip


def contents(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- one line naming the problem and the fix, exit status 2, nothing left behind ------------
ERRORS = [
    ([*TOY_GENERATE, "--out", "a-file/x"], "--out a-file/x: a-file is a file, not a folder"),
    ([*TOY_GENERATE, "--out", "a-file"], "--out a-file: is a file, not a folder"),
    pytest.param([*TOY_GENERATE, "--out", "/proc/catpatch-test/x"], "cannot write there",
                 marks=NO_PROC),
    ([*SMALL_DEMO, "--out", "a-file/x"], "--out a-file/x: a-file is a file, not a folder"),
    pytest.param([*SMALL_DEMO, "--out", "/proc/catpatch-test"], "cannot write there",
                 marks=NO_PROC),
    (["study", "--quick", "--images", "2", "--out", "a-file/x"], "a-file is a file"),
    # every command's --out goes through the same check, before any model is loaded
    (["heterogeneity", "--out", "a-file/x"], "--out a-file/x: a-file is a file, not a folder"),
    (["heterogeneity", "--out", "a-file"], "--out a-file: is a file, not a folder"),
    pytest.param(["heterogeneity", "--out", "/proc/x"], "--out /proc/x: cannot write there",
                 marks=NO_PROC),
    (["eval", "--reference", "r", "--candidate", "c", "--json", "a-file/e.json"],
     "--json a-file: is a file, not a folder"),
    (["census", "--keep-ratio", "0"], "--keep-ratio 0.0: must be in (0, 1]"),
    (["census", "--size", "8x8"], "--size 8x8: height and width must be positive multiples of 16"),
    (["census", "--size", "1000x1000"], "e.g. --size 992x992"),
    (["census", "--size", "16x16"], "--num-clusters 20 exceeds the 1 image token at 16x16"),
    (["census", "--batch", "0"], "--batch: must be >= 1"),
    (["bench", "--size", "1000x1000"], "e.g. --size 992x992"),
    ([*TOY_GENERATE, "--out", "g", "--lora", "./missing"],
     "--lora ./missing: no such file or folder"),
    (["bench", "--model", "./missing"], "--model ./missing: no such folder"),
    (["bench", "--model", "nope/nope"], "not in the local Hugging Face cache and HF_HUB_OFFLINE"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", ERRORS)
def test_error_is_one_line_naming_the_fix(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("in the way")
    before = contents(tmp_path)
    assert run_cli(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"catpatch {argv[0]}: error: ") and message in lines[0], lines
    assert "Traceback" not in captured.err and captured.out == ""
    assert contents(tmp_path) == before, "a failed run left files or folders behind"


def test_census_and_bench_reject_a_size_with_the_same_words(capsys):
    messages = []
    for command in ("census", "bench"):
        assert run_cli([command, "--shape", "cpu-256x8", "--size", "1000x1000"]) == 2
        messages.append(capsys.readouterr().err.split(": error: ", 1)[1])
    assert messages[0] == messages[1]


def test_bench_fails_fast_when_the_hub_cannot_be_reached(monkeypatch, capsys):
    """Online but nothing answers: one line after a single look-up, not huggingface_hub's minute
    and a half of retries. "Fast" is counted, not timed: every request huggingface_hub makes
    goes through a transport that refuses the connection, and no download or retrying entry
    point is called at all."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants, file_download
    from huggingface_hub.utils import _http

    requests, downloads = [], []

    def refuse(request):
        requests.append(str(request.url))
        raise httpx2.ConnectError("connection refused", request=request)

    def download(*args, **kwargs):
        downloads.append(args)
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY",
                        lambda: httpx2.Client(transport=httpx2.MockTransport(refuse)))  # fmt: skip
    for module, name in [(huggingface_hub, "hf_hub_download"), (file_download, "hf_hub_download"),
                         (huggingface_hub, "snapshot_download"), (_http, "http_backoff"),
                         (_http, "http_stream_backoff")]:  # fmt: skip
        monkeypatch.setattr(module, name, download)
    _http.close_session()  # the next request builds a client from the factory above
    try:
        assert run_cli(["bench", "--model", "nope/nope"]) == 2
    finally:
        _http.close_session()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Hugging Face hub" in lines[0], lines
    # exactly one request for the model: bench looks it up once and hands the result to both
    # the default size and the settings check, and nothing retries it; huggingface_hub's own
    # agent registry request aside
    model = [url for url in requests if "/api/models/" in url]
    assert model == [f"{constants.ENDPOINT}/api/models/nope/nope"], requests
    assert len(requests) - len(model) <= 1, requests
    assert downloads == []


def test_a_closed_pipe_ends_quietly():
    """`catpatch census | head -3` where head has gone: no BrokenPipeError, status 141."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "catpatch", "census", "--shape", "cpu-256x8", "--size", "256"],
            stdout=write, stderr=subprocess.PIPE, text=True, env=env(), timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == ""


def test_version(capsys):
    assert run_cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"catpatch {catpatch.__version__}"
    # the version is the CHANGELOG's latest release
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - ", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert catpatch.__version__ == released[0]


def test_generate_fp16_on_cpu_is_one_note_and_plurals_are_right(tmp_path):
    """diffusers says fp16 on the CPU "will fail"; it runs (torch has CPU half kernels), so
    the user gets one line saying it is slower instead; and "1 of 1 image", not "1 images"."""
    command = [sys.executable, "-m", "catpatch", *TOY_GENERATE, "--dtype", "fp16", "--device",
               "cpu", "--out", str(tmp_path / "g")]  # fmt: skip
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "catpatch generate: warning: --dtype fp16 on the CPU works but is slower than fp32 "
        "there (CPUs have few half-precision kernels); use fp32 on a CPU, fp16 or bf16 on a GPU"
    ]
    assert "1 of 1 image in" in done.stdout and "1 images" not in done.stdout
    assert (tmp_path / "g" / "00000_000.png").is_file()


# ---- timings that cannot mislead -------------------------------------------------------------
def test_runs_label_and_bound():
    assert runs_label(1) == "1 run" and runs_label(3) == "median of 3 runs"
    assert not impossible(1.7, 1.72) and not impossible(1.78, 1.72) and impossible(17.6, 1.72)
    assert bound_note(1.5, 1.72) == "" and "at most 1.72x" in bound_note(17.63, 1.72)


def clock(costs: dict[str, list[float]], order: list[str]):
    """Timed callables for `time_pair` that return the next cost of their side."""

    def side(name: str):
        def run() -> float:
            order.append(name)
            return costs[name].pop(0)

        return run

    return side("unpatched"), side("cat")


def test_a_disturbed_run_is_remeasured():
    """The README's case: one repeat whose unpatched run took 8.91 s on a busy machine, against
    0.51 s for CAT, where the MACs allow at most 1.72x: timed again, the medians are right."""
    order: list[str] = []
    unpatched, cat = clock({"unpatched": [8.91, 1.0, 1.0, 1.0], "cat": [0.51, 0.7, 0.7, 0.7]},
                           order)  # fmt: skip
    timing = time_pair(unpatched, cat, repeats=1, bound=1 / 0.582)
    assert timing.remeasured and timing.plausible and timing.runs == 4
    assert timing.label() == "median of 4 runs"
    assert abs(timing.speedup - 1.0 / 0.7) < 1e-9
    assert order == ["unpatched", "cat", "cat", "unpatched", "unpatched", "cat", "cat",
                     "unpatched"], "alternating order"  # fmt: skip


def test_a_busy_machine_is_named():
    from catpatch.cli.timing import busy_note, load_average

    assert busy_note(None, 2) == "" and busy_note(1.5, 2) == ""
    assert "load average 4.5 on 2 cores" in busy_note(4.5, 2)
    # a load equal to the core count already keeps every core busy
    assert "load average 2.0 on 2 cores" in busy_note(2.0, 2)
    assert busy_note(1.99, 2) == ""
    load = load_average()
    assert load is None or load >= 0


def test_an_impossible_speedup_that_stays_is_flagged():
    costs = {"unpatched": [9.0] * 4, "cat": [0.5] * 4}
    timing = time_pair(*clock(costs, []), repeats=1, bound=1.72)
    assert timing.remeasured and not timing.plausible
    assert "at most 1.72x" in timing.note()
    plain = PairTiming(bound=1.72, unpatched_s=[1.0], patched_s=[0.7])
    assert plain.plausible and plain.label() == "1 run" and plain.note() == ""


def test_demo_flags_an_impossible_timing(tmp_path, monkeypatch, capsys):
    """Every unpatched run of the demo made to look 50x slower: re-measured, still impossible,
    so the demo says so in a warning and summary.json records `plausible: false`."""
    from catpatch import is_patched
    from catpatch.cli import demo

    real = demo.time.perf_counter
    loaded = []
    original = demo.load_demo_pipeline

    def load(*args, **kwargs):
        pipe, call, source = original(*args, **kwargs)
        loaded.append(pipe)
        return pipe, call, source

    class SlowClock:  # a clock that runs 50 times faster while the pipeline is unpatched
        @staticmethod
        def perf_counter() -> float:
            return real() * (50.0 if loaded and not is_patched(loaded[0]) else 1.0)

    monkeypatch.setattr(demo, "load_demo_pipeline", load)
    monkeypatch.setattr(demo, "time", SlowClock)
    argv = [*SMALL_DEMO[:7], "--repeats", "1", "--no-progress", "--prompt", PROMPT, "--out",
            str(tmp_path / "d")]  # fmt: skip
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1, captured.err
    assert "more than the patched run's arithmetic allows" in warning[0], captured.err
    timing = json.loads((tmp_path / "d" / "summary.json").read_text())["timing"]
    assert timing["remeasured"] and not timing["plausible"] and timing["warm_runs"] == 4
    assert timing["speedup"] > timing["bound"] > 1.0


def test_demo_one_run_psnr_version_and_plain_output_when_piped(tmp_path):
    """A fresh `catpatch demo` with stderr piped: no progress bar (no carriage returns), "1 run"
    and the bound in the timing line, PSNR per image on stdout and in summary.json."""
    command = [sys.executable, "-m", "catpatch", *SMALL_DEMO[:7], "--repeats", "1",
               "--prompt", PROMPT, "--prompt", "a large blue square at the left on a checkered "
               "green background", "--out", str(tmp_path / "d")]  # fmt: skip
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    # "1 run" (more only when a disturbed timing came out above the bound: then medians)
    assert re.search(r"time per run of 2 images, (1 run|median of \d+ runs) of each", done.stdout)
    assert "median of 1" not in done.stdout and "by the MACs" in done.stdout
    assert "PSNR of each image with step reuse against its unpatched one: " in done.stdout
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["catpatch_version"] == catpatch.__version__
    psnr = summary["psnr_db"]
    assert len(psnr) == 2 and all(p is None or 10 < p < 100 for p in psnr)
    assert summary["timing"]["bound"] == pytest.approx(1 / summary["macs_ratio"], rel=1e-3)


def test_psnr_db():
    from catpatch.cli.demo import psnr_db

    a = np.zeros((4, 4, 3))
    assert psnr_db(a, a) == float("inf")
    assert psnr_db(a, a + 0.1) == pytest.approx(20.0)


# ---- bench: whole-step selections, versions, the bound check ---------------------------------
TINY_BENCH = ["bench", "--shape", "tiny-sd3", "--size", "128x128", "--steps", "6",
              "--warmup-steps", "2", "--repeats", "1", "--text-tokens", "16", "--json"]  # fmt: skip


@pytest.mark.parametrize("selection", ["step", "cat+reuse"])
def test_bench_times_whole_step_selections(selection, capsys):
    assert run_cli([*TINY_BENCH, "--selection", selection]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["catpatch_version"] == catpatch.__version__
    assert result["steps_skipped"] > 0
    assert result["steps_full"] + result["steps_pruned"] + result["steps_skipped"] == 6
    assert (result["steps_pruned"] > 0) == (selection == "cat+reuse")
    assert result["bound"] > 1.0 and result["macs_ratio"] < 1.0


def test_bench_remeasures_and_flags_an_impossible_speedup(monkeypatch, capsys):
    """Every unpatched loop made to read 100 s: the speed-up is impossible, so bench times more
    runs, still finds it impossible, marks the table and prints one warning."""
    from catpatch.cli.bench import measure

    real = measure._timed

    def timed(loop, device) -> float:
        seconds = real(loop, device)
        unpatched = isinstance(loop, measure.Loop) and measure.get_patch(loop.transformer) is None
        return 100.0 if unpatched else seconds

    monkeypatch.setattr(measure, "_timed", timed)
    assert run_cli(TINY_BENCH[:-1]) == 0
    captured = capsys.readouterr()
    assert "median of 4 runs" in captured.out and "IMPOSSIBLE" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("catpatch bench: warning: the measured")


# ---- eval and the quick study ----------------------------------------------------------------
def test_eval_flags_a_timing_above_the_bound():
    from catpatch.cli.evaluate import EvalResult

    settings = {"device": "cpu", "steps": 28}
    runs = {
        "reference": {"settings": settings, "time_s": 10.0, "timed": 1, "cat": None},
        "candidate": {"settings": settings, "time_s": 1.0, "timed": 3,
                      "cat": {"macs_ratio": 0.5, "computed_fraction": 0.5}},
    }  # fmt: skip
    result = EvalResult("a", "b", counts={}, runs=runs)
    line = result.timing_line()
    assert "(1 image)" in line and "(3 images)" in line
    assert "warning: the measured 10.00x is more than the patched run's arithmetic allows" in line
    runs["reference"]["time_s"] = 1.8
    assert "warning" not in result.timing_line()
    assert result.to_dict()["catpatch_version"] == catpatch.__version__


def test_quick_study_outputs_have_no_empty_tables_or_undrawn_legend_lines(tmp_path, monkeypatch):
    """Rows as the quick study makes them (28 steps, α 0.3, token ablations and step reuse):
    targets.md says which comparisons it could not make instead of printing empty tables, and
    every line the plot's legend names is drawn (two points or a marker)."""
    import matplotlib.figure

    from catpatch.cli import study

    def row(method: str, macs: float, psnr: float) -> study.Row:
        return study.Row(28, method, "", 0.3, 8, 20, macs, psnr, psnr - 3, 0.9, 0.1, 0.9, 0.5,
                         1.0, (psnr - 1, psnr + 1))  # fmt: skip

    rows = [study.Row(28, "unpatched", "", 1.0, 28, 0, 1.0, float("inf"), float("inf"), 1.0,
                      0.0, 0.95, 0.6, 1.0)]  # fmt: skip
    rows += [row(m, 0.55, 30.0 - i) for i, m in enumerate(study.QUICK_METHODS)]
    legends: list[list[tuple[str, int, str]]] = []

    def savefig(fig, *args, **kwargs):
        for ax in fig.axes:
            drawn = {line.get_label(): (len(line.get_xdata()), line.get_marker())
                     for line in ax.get_lines()}  # fmt: skip
            names = [t.get_text() for t in ax.get_legend().get_texts()]
            legends.append([(n, *drawn[n]) for n in names])

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    study.write_outputs(tmp_path, rows, 2)
    targets = (tmp_path / "targets.md").read_text()
    assert targets.startswith(f"catpatch {catpatch.__version__}.")
    tables = targets.split("\n\n")
    for block in tables:  # a header row is always followed by a data row
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("| steps"):
            assert len(lines) > 2, f"empty table: {block}"
    assert "Not in this study: no `cat+reuse` run" in targets
    assert "Not in this study: no TaylorSeerCache or MagCache run" in targets
    assert legends and all(
        points > 1 or marker not in ("None", "", None) for entries in legends
        for _, points, marker in entries
    ), legends  # fmt: skip
    assert "catpatch frontier" not in [name for entries in legends for name, *_ in entries]
    assert (
        (tmp_path / "study.md").read_text().startswith(f"catpatch {catpatch.__version__}; 2 images")
    )
