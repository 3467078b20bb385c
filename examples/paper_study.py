"""The reference's own selection against catpatch's CAT on the shipped toy model.

    python examples/paper_study.py [--images 64] [--steps 28] [--keep-ratios 0.3 0.2 0.5]
                                   [--out out/paper-vs-cat.jsonl]

For each keep ratio, generates the evaluation prompts of the toy model unpatched, with
catpatch's CAT (`CATConfig(keep_ratio=α)`, selection "cat") and with the reference's selection
rules (`CATConfig.paper(keep_ratio=α)`, selection "paper"), same seeds, and reports per
configuration: MACs of each, mean PSNR of each against unpatched, and the paired difference
paper - cat with its standard error over images (the noise of the comparison). Rows are
appended to the results file as they finish.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import catpatch
from catpatch import CATConfig, apply_cat, cat_stats, remove_cat, toy
from catpatch.cli.study import fidelity, generate_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per run (default 64)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    parser.add_argument(
        "--keep-ratios", type=float, nargs="+", default=[0.3, 0.2, 0.5], help="α values"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="batch (default 16)")
    parser.add_argument("--out", default="out/paper-vs-cat.jsonl", help="results file (JSON lines)")
    args = parser.parse_args()
    pipe = toy.load_pipeline()
    prompts = toy.eval_prompts(args.images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    start = time.perf_counter()
    _, reference = generate_images(pipe, prompts, args.steps, args.batch_size)
    print(f"unpatched: {time.perf_counter() - start:.0f} s", flush=True)
    for keep in args.keep_ratios:
        psnr, macs = {}, {}
        configs = {
            "cat": CATConfig(selection="cat", keep_ratio=keep),
            "paper": CATConfig.paper(keep_ratio=keep),
        }
        for name, config in configs.items():
            start = time.perf_counter()
            apply_cat(pipe, config)
            _, images = generate_images(pipe, prompts, args.steps, args.batch_size)
            macs[name] = cat_stats(pipe).macs_ratio
            remove_cat(pipe)
            psnr[name] = fidelity(images, reference)[0]
            print(f"{config!r}: {time.perf_counter() - start:.0f} s", flush=True)
        diff = psnr["paper"] - psnr["cat"]
        row = {
            "steps": args.steps, "keep_ratio": keep, "images": args.images,
            "macs_cat": macs["cat"], "macs_paper": macs["paper"],
            "psnr_cat": float(psnr["cat"].mean()), "psnr_paper": float(psnr["paper"].mean()),
            "paper_minus_cat": float(diff.mean()),
            "stderr": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "paper_better": int((diff > 0).sum()),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps({**row, "catpatch_version": catpatch.__version__}) + "\n")


if __name__ == "__main__":
    main()
