"""CAT combined with step reuse against CAT and step reuse alone, on the shipped toy model.

    python examples/reuse_study.py [--images 32] [--out out/reuse-study.jsonl]

Mean PSNR against unpatched (same seeds) and the MACs of each configuration, 28 steps: the
numbers behind the README's "CAT with step reuse" rows. The toy's text tokens outnumber its
image tokens, so a pruned step costs more of a full one here than on SD3-medium at 1024².
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import catpatch
from catpatch import CATConfig, apply_cat, cat_stats, remove_cat, toy
from catpatch.cli.study import fidelity, generate_images

CONFIGS = {
    "cat a0.3": CATConfig(selection="cat"),
    "cat+reuse a0.3 macs0.6": CATConfig(selection="cat+reuse", reuse_macs=0.6),
    "cat+reuse a0.3 macs0.6 forecast": CATConfig(
        selection="cat+reuse", reuse_macs=0.6, reuse_order=1
    ),
    "cat+reuse a0.5 macs0.6": CATConfig(selection="cat+reuse", keep_ratio=0.5, reuse_macs=0.6),
    "step a0.1": CATConfig(selection="step", keep_ratio=0.1),
    "step a0.1 forecast": CATConfig(selection="step", keep_ratio=0.1, reuse_order=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images per run (default 32)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    parser.add_argument("--out", default="out/reuse-study.jsonl", help="results")
    args = parser.parse_args()
    pipe = toy.load_pipeline()
    prompts = toy.eval_prompts(args.images)
    _, reference = generate_images(pipe, prompts, args.steps, 16)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for name, config in CONFIGS.items():
            apply_cat(pipe, config)
            _, images = generate_images(pipe, prompts, args.steps, 16)
            macs = cat_stats(pipe).macs_ratio
            remove_cat(pipe)
            psnr = fidelity(images, reference)[0]
            row = {"config": name, "steps": args.steps, "images": args.images,
                   "macs": round(macs, 4), "psnr": round(float(psnr.mean()), 3)}  # fmt: skip
            f.write(json.dumps({**row, "catpatch_version": catpatch.__version__}) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
