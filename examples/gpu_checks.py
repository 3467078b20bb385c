"""The prepared GPU run for the performance work: one script, results saved as it goes.

    python examples/gpu_checks.py --out "$OUT"            # everything, most important first
    python examples/gpu_checks.py --out "$OUT" --rows sync medium-eager
    python examples/gpu_checks.py --out out/gpu --device cpu --shape tiny-sd3 --size 128 \
        --steps 6 --warmup-steps 3 --num-clusters 8 --text-tokens 16 --repeats 1   # CPU smoke run

1. `sync`: a pruned step of an SD3-medium-shaped transformer (1024², bf16) runs under
   `torch.cuda.set_sync_debug_mode("error")`: no host sync in the per-step path.
2. bench rows (`catpatch bench`, random weights, 1024², batch 1 + CFG = 2 rows, bf16, 28 steps,
   α 0.3, t0 8): the default policy (step reuse) on SD3-medium eager and with CUDA graphs, then
   CAT on SD3-medium and SD3.5-large, exact and lean, eager and with CUDA graphs
   ("reduce-overhead", regional compilation on both sides; the row also times the plain eager
   baseline), and SD3-medium compiled "default".
Each result is appended to OUT/results.jsonl as soon as it exists, so a run cut short still
leaves what it measured (run each row in its own process, under `timeout`, to bound them).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

import catpatch
from catpatch import CATConfig, apply_cat, cat_generation
from catpatch.cli.bench import BenchSettings, run
from catpatch.models.shapes import build_transformer

BASE = BenchSettings(
    shape="sd3-medium",
    height=1024,
    width=1024,
    steps=28,
    batch=1,
    cfg=True,
    dtype="bf16",
    device="cuda",
    repeats=3,
    lean=False,  # the exact rows; the "-lean" rows set the default lean=True
    selection="cat",  # CAT's rows; the "step" rows time the default policy (0.3.0)
)
LARGE = replace(BASE, shape="sd3.5-large")
STEP = replace(BASE, selection="step", lean=True)  # 0.3.0's default policy: step reuse
BUDGET = replace(STEP, macs=0.4)  # the budget knob (0.4.0): planned steps, auto forecast
ROWS = {  # most important first: a run cut short keeps what it measured
    "medium-budget-0.4": BUDGET,
    "medium-budget-0.4-graphs": replace(BUDGET, compile="reduce-overhead"),
    "medium-step": STEP,
    "medium-step-graphs": replace(STEP, compile="reduce-overhead"),
    "medium-eager": BASE,
    "medium-eager-lean": replace(BASE, lean=True),
    "medium-graphs": replace(BASE, compile="reduce-overhead"),
    "medium-graphs-lean": replace(BASE, compile="reduce-overhead", lean=True),
    "large-eager-lean": replace(LARGE, lean=True),
    "large-graphs-lean": replace(LARGE, compile="reduce-overhead", lean=True),
    "large-eager": LARGE,
    "medium-default": replace(BASE, compile="default"),
}


def sync_check() -> dict:
    model = build_transformer("sd3-medium", device="cuda", dtype=torch.bfloat16)
    apply_cat(model, CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=2))
    rows, args = (
        2,
        dict(
            encoder_hidden_states=torch.randn(2, 333, 4096, device="cuda", dtype=torch.bfloat16),
            pooled_projections=torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16),
            timestep=torch.full((2,), 500.0, device="cuda"),
        ),
    )
    latents = torch.randn(rows, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), cat_generation(model, cfg=True):
        for _ in range(3):  # reference, record, first pruned step (warms up the allocator)
            model(hidden_states=latents, **args)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(hidden_states=latents, **args)  # a pruned step, selection included
            torch.cuda.set_sync_debug_mode(0)
            return {"pruned_step_without_sync": True}
        except RuntimeError as error:
            torch.cuda.set_sync_debug_mode(0)
            return {"pruned_step_without_sync": False, "error": str(error)[:2000]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", default="out/gpu", help="folder of results.jsonl")
    parser.add_argument(
        "--rows", nargs="*", default=["sync", *ROWS], choices=["sync", *ROWS], help="what to run"
    )
    # Overrides of every bench row, for a small run (e.g. on a CPU): BenchSettings fields.
    parser.add_argument("--device", default="cuda", help="bench device (sync needs cuda)")
    for name, kind in [("shape", str), ("size", int), ("steps", int), ("warmup-steps", int),
                       ("num-clusters", int), ("text-tokens", int), ("repeats", int)]:  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, help="override every bench row's value")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in dict(
            shape=args.shape, height=args.size, width=args.size, steps=args.steps,
            warmup_steps=args.warmup_steps, num_clusters=args.num_clusters,
            text_tokens=args.text_tokens, repeats=args.repeats,
        ).items()
        if v is not None
    }  # fmt: skip
    cuda = args.device.startswith("cuda")
    if not cuda:
        overrides.update(device=args.device, dtype="fp32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name() if cuda else args.device, torch.__version__, flush=True)
    for row in args.rows:
        start = time.time()
        try:
            if row == "sync":
                result = sync_check() if cuda else {"skipped": "the sync check needs CUDA"}
                text = json.dumps(result, indent=2)
            else:
                bench = run(replace(ROWS[row], **overrides))
                result, text = json.loads(bench.to_json()), bench.table()
        except Exception:  # keep going: later rows may still fit in the time
            result, text = {"error": traceback.format_exc()}, traceback.format_exc()
        result["wall_s"] = round(time.time() - start, 1)
        with open(out / "results.jsonl", "a") as f:
            record = {"row": row, "catpatch_version": catpatch.__version__, **result}
            f.write(json.dumps(record) + "\n")
        print(f"== {row} ({result['wall_s']} s)\n{text}", flush=True)
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
