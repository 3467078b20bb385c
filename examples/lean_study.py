"""Lean against exact CAT on the shipped toy model: paired PSNR against unpatched.

    python examples/lean_study.py [--images 64] [--out out/lean-study.jsonl]

For 28 and 50 steps and keep ratios 0.2 / 0.3 / 0.5, generates the evaluation prompts of the
toy model unpatched, with default CAT and with `CATConfig(lean=True)` (same seeds), and
reports per configuration: MACs of each, mean PSNR of each against unpatched, and the paired
difference lean - exact with its standard error over images (the noise of the comparison).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import catpatch
from catpatch import CATConfig, apply_cat, cat_stats, remove_cat, toy
from catpatch.cli.study import KEEP_RATIOS, STEPS, fidelity, generate_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per run (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch (default 16)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="step counts")
    parser.add_argument(
        "--keep-ratios", type=float, nargs="+", default=list(KEEP_RATIOS), help="α values"
    )
    parser.add_argument("--out", default="out/lean-study.jsonl", help="results file (JSON lines)")
    args = parser.parse_args()
    pipe = toy.load_pipeline()
    prompts = toy.eval_prompts(args.images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for steps in args.steps:
        _, reference = generate_images(pipe, prompts, steps, args.batch_size)
        for keep in args.keep_ratios:
            psnr, macs = {}, {}
            for lean in (False, True):
                apply_cat(pipe, CATConfig(selection="cat", keep_ratio=keep, lean=lean))
                _, images = generate_images(pipe, prompts, steps, args.batch_size)
                macs[lean] = cat_stats(pipe).macs_ratio
                remove_cat(pipe)
                psnr[lean] = fidelity(images, reference)[0]
            diff = psnr[True] - psnr[False]
            row = {
                "steps": steps, "keep_ratio": keep, "images": args.images,
                "macs_exact": macs[False], "macs_lean": macs[True],
                "psnr_exact": float(psnr[False].mean()), "psnr_lean": float(psnr[True].mean()),
                "lean_minus_exact": float(diff.mean()),
                "stderr": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    version = {"catpatch_version": catpatch.__version__}
    out.write_text("".join(json.dumps({**r, **version}) + "\n" for r in rows))


if __name__ == "__main__":
    main()
