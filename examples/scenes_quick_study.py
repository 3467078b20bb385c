"""A first look at token policies on the scenes model: the quick study plus a few peers.

    python examples/scenes_quick_study.py [--images 32] [--out out/study-scenes-quick]

28 steps, α 0.3 (MACs 0.537): CAT, random, drift only, round robin, step reuse (the quick
study), the reference's rules as run (`paper`, `lean=False`), CAT with the token forecast, and
at lower MACs diffusers' MagCache (thresholds 0.06, 0.24), TaylorSeerCache lite (interval 3)
and step reuse at α 0.1; then CAT, round robin and step reuse at α 0.2 / 0.5 (28 steps) and
0.2 / 0.3 / 0.5 (50 steps). Resumes in the same folder. The full two-model study is
`catpatch study --model scenes` (hours on a 2-core CPU). Output of the run in the README:
examples/results/study-scenes-quick-2026-12-05.*.
"""

from __future__ import annotations

import argparse

from catpatch import CATConfig
from catpatch.cli.study import run_study
from catpatch.cli.study.methods import configurations
from catpatch.peers.magcache import MagCache
from catpatch.peers.taylorseer import TaylorSeer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="evaluation captions")
    parser.add_argument("--out", default="out/study-scenes-quick", help="output folder")
    args = parser.parse_args(argv)
    runs = configurations(quick=True) + [
        (28, "paper", CATConfig(keep_ratio=0.3, selection="paper", lean=False)),
        (28, "cat+forecast", CATConfig(keep_ratio=0.3, selection="cat", token_order=1)),
        (28, "magcache", MagCache(threshold=0.06, num_inference_steps=28)),
        (28, "magcache", MagCache(threshold=0.24, num_inference_steps=28)),
        (28, "taylorseer-lite", TaylorSeer(cache_interval=3, lite=True)),
        (28, "step", CATConfig(keep_ratio=0.1, selection="step")),
    ]
    # The three policies that decide the default, at the other keep ratios and at 50 steps.
    for steps, keep in ((28, 0.2), (28, 0.5), (50, 0.2), (50, 0.3), (50, 0.5)):
        for method, fields in (("cat", {"selection": "cat"}), ("stale", {"selection": "stale"})):
            runs.append((steps, method, CATConfig(keep_ratio=keep, **fields)))
        runs.append((steps, "step", CATConfig(keep_ratio=keep, selection="step")))
    run_study(args.out, images=args.images, runs=runs, model="scenes")


if __name__ == "__main__":
    main()
