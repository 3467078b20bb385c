"""What CAT's cluster anchors add to a budgeted run (`CATConfig(macs=B, anchors=k)`).

    python examples/anchor_study.py --model toy --steps 28 --images 32 \\
        --out examples/results/anchors-toy-2026-12-06.jsonl

For each budget: the planned run without anchors; with k anchors per cluster (chosen by
CAT's drift × staleness score or at random) and the correction at gains 0 and 1. Gain 0
computes the anchors but does not use them: the same schedule as with the correction, so
gain 1 against gain 0 is the correction's own effect, and anchors against no anchors at the
same budget is what spending MACs on anchors instead of whole steps gives. PSNR per image
against the unpatched images; paired differences ± SE printed at the end. Resumable.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat
from catpatch import trained as shipped
from catpatch.cli.study.runs import fidelity, generate_images


def settings(budget: float) -> list[CATConfig]:
    runs = [CATConfig(macs=budget)]
    for anchors in (1, 2):
        for choice in ("score", "random"):
            for gain in (0.0, 1.0):
                runs.append(
                    CATConfig(macs=budget, anchors=anchors, anchor_choice=choice, anchor_gain=gain)
                )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    done = {}
    if out.exists():
        done = {r["config"]: r for r in map(json.loads, out.read_text().splitlines())}
    trained = shipped.get(args.model)
    pipe = trained.load_pipeline()
    prompts = trained.eval_prompts(args.images)
    _, reference = generate_images(pipe, prompts, args.steps, model=trained)
    for budget in args.budgets:
        for config in settings(budget):
            key = f"{args.model} {args.steps} {args.images} {config!r}"
            if key in done:
                continue
            apply_cat(pipe, config)
            try:
                _, images = generate_images(pipe, prompts, args.steps, model=trained)
            except ValueError as error:  # its anchors cost more than the budget leaves
                print(f"{config!r}: {error}")
                continue
            finally:
                stats = cat_stats(pipe)
                remove_cat(pipe)
            psnr, ssim = fidelity(images, reference)
            row = dict(
                config=key, budget=budget, anchors=config.anchors, choice=config.anchor_choice,
                gain=config.anchor_gain, macs=stats.macs_ratio, plan=stats.plan.describe(),
                psnr=float(psnr.mean()), psnr_min=float(psnr.min()), ssim=float(ssim.mean()),
                psnr_each=[float(v) for v in psnr],
            )  # fmt: skip
            done[key] = row
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{config!r}: MACs {row['macs']:.3f} PSNR {row['psnr']:.2f}", flush=True)
    report(list(done.values()))


def report(rows: list[dict]) -> None:
    """Paired differences: each anchored run against the plain planned run of its budget and
    against the same schedule at gain 0."""
    def diff(a, b):
        d = np.array(a["psnr_each"]) - np.array(b["psnr_each"])
        return f"{d.mean():+.2f} ± {d.std(ddof=1) / math.sqrt(len(d)):.2f}"

    for budget in sorted({r["budget"] for r in rows}):
        group = [r for r in rows if r["budget"] == budget]
        plain = next(r for r in group if r["anchors"] == 0)
        print(f"\nbudget {budget}: no anchors MACs {plain['macs']:.3f} PSNR {plain['psnr']:.2f}")
        for r in group:
            if r["anchors"] == 0:
                continue
            same = next(
                s for s in group
                if (s["anchors"], s["choice"], s["gain"]) == (r["anchors"], r["choice"], 0.0)
            )  # fmt: skip
            print(
                f"  k={r['anchors']} {r['choice']:6s} gain {r['gain']:.1f}: MACs {r['macs']:.3f} "
                f"PSNR {r['psnr']:.2f} (vs no anchors {diff(r, plain)}; vs gain 0 {diff(r, same)})"
            )


if __name__ == "__main__":
    main()
