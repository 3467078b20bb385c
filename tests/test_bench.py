"""`catpatch bench` smoke test: a tiny shape, a few steps, JSON with the measured ratio."""

from __future__ import annotations

import json
import re

from catpatch.cli import main


def test_bench_json(capsys):
    code = main([
        "bench", "--shape", "tiny-sd3", "--size", "128x128", "--steps", "6", "--warmup-steps",
        "3", "--num-clusters", "8", "--repeats", "1", "--text-tokens", "16", "--device", "cpu",
        "--json", "--selection", "cat",
    ])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 64 and result["budget"] == 19 and result["rows"] == 2
    runs = 4 if result["remeasured"] else 1  # re-measured if a busy machine disturbed it
    assert len(result["unpatched_s"]) == runs and len(result["patched_s"]) == runs
    assert result["speedup"] > 0 and result["bound"] > 1.0
    assert abs(result["fraction_of_bound"] - result["speedup"] / result["bound"]) < 1e-9
    assert 0.4 < result["macs_ratio"] < 1.0
    assert result["cache_bytes"] > 0 and result["pruned_step_ms"] > 0
    assert result["selection_ms"] > 0


def test_bench_table(capsys):
    main(
        [
            "bench",
            "--shape",
            "tiny-sd3",
            "--size",
            "128x128",
            "--steps",
            "5",
            "--warmup-steps",
            "2",
            "--repeats",
            "1",
            "--text-tokens",
            "8",
            "--no-cfg",
        ]
    )
    table = capsys.readouterr().out
    assert "speed-up" in table and "arithmetic bound" in table and "batch 1 (1 rows)" in table
    # the default policy, named where the table says what ran and what it timed; no clusters
    assert "policy  " in table and "step reuse (--selection step)" in table
    # one timed run, or 1 + 3 when a busy machine made the first look faster than the bound
    assert re.search(r"loop step reuse \(\d+ runs?\)", table)
    assert "clusters" not in table and "CAT" not in table


def test_bench_compiled_reports_the_eager_baseline(capsys):
    main(["bench", "--shape", "tiny-sd3", "--size", "128x128", "--steps", "4", "--warmup-steps",
          "2", "--num-clusters", "4", "--repeats", "1", "--text-tokens", "8", "--compile",
          "default", "--json", "--selection", "cat"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    runs = 4 if result["remeasured"] else 1  # re-measured if a busy machine disturbed it
    assert len(result["eager_unpatched_s"]) == runs and result["speedup_vs_eager"] > 0
    assert result["settings"]["compile"] == "default"
