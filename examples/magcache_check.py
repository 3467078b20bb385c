"""diffusers' MagCache on the shipped toy SD3 pipeline, calibrated as its docs say.

    python examples/magcache_check.py [--images 8] [--thresholds 0.02 0.06 0.12 0.24]

Calibrates MagCache's magnitude ratios at 28 steps on `--images` captions that are not
evaluated (eval prompts `images..2*images-1`), then generates the first `--images` eval
prompts unpatched and with MagCache at each threshold (diffusers' other defaults: at most 3
steps skipped in a row, the first 6 steps always run), and prints the skipped steps, mean and
lowest PSNR against the unpatched images, the detector's colour+position accuracy, and MACs
against the unpatched run (torch's FLOP counter on one caption: which steps are skipped
depends only on the ratios). Output: examples/results/magcache-toy-check.txt.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from catpatch import toy
from catpatch.peers.magcache import (
    MagCache,
    apply_magcache,
    calibrate_magcache,
    magcache_skipped_steps,
    remove_magcache,
)
from catpatch.stats import measured_macs

MODEL = "SD3Transformer2DModel"


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of (N, H, W, 3) images in [0, 1]."""
    mse = ((images.astype(np.float64) - reference) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-20))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="evaluated (and calibration) images")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.06, 0.12, 0.24])
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    pipe, detector = toy.load_pipeline(), toy.load_detector()
    call = dict(toy.CALL_KWARGS)
    steps = call.pop("num_inference_steps")
    cases = toy.eval_prompts(2 * args.images)
    prompts, held_out = cases[: args.images], cases[args.images :]
    labels = np.array([p.labels for p in prompts])

    start = time.perf_counter()
    ratios = calibrate_magcache(
        pipe,
        [p.prompt for p in held_out],
        steps,
        generator=[torch.Generator().manual_seed(p.seed) for p in held_out],
        **call,
    )
    print(f"calibration at {steps} steps on {len(held_out)} held-out captions "
          f"({time.perf_counter() - start:.0f} s):")  # fmt: skip
    print("mag_ratios =", [round(r, 5) for r in ratios])

    def one() -> None:
        toy.generate(pipe, prompts[:1], **toy.CALL_KWARGS)

    base = toy.generate(pipe, prompts, **toy.CALL_KWARGS)
    base_macs = measured_macs(one, MODEL)
    accuracy = toy.MODEL.score(detector, base, labels)["colour+position"]
    print(f"\n{args.images} eval images, {steps} steps, guidance {call['guidance_scale']}")
    print(f"unpatched: colour+position accuracy {accuracy:.3f}, "
          f"{base_macs / 1e9:.2f} GMACs per image")  # fmt: skip
    header = f"{'threshold':>9} {'skipped':>7} {'MACs':>6} {'PSNR dB':>8} {'min':>6} {'acc':>6}"
    print(header + "  skipped steps")
    for threshold in args.thresholds:
        apply_magcache(
            pipe, MagCache(threshold=threshold, num_inference_steps=steps, mag_ratios=ratios)
        )
        try:
            images = toy.generate(pipe, prompts, **toy.CALL_KWARGS)
            skipped = magcache_skipped_steps(pipe)  # of the last batch: the same for all
            macs = measured_macs(one, MODEL) / base_macs
        finally:
            remove_magcache(pipe)
        each = psnr(images, base)
        accuracy = toy.MODEL.score(detector, images, labels)["colour+position"]
        print(f"{threshold:>9g} {len(skipped):>7d} {macs:>6.3f} {each.mean():>8.2f} "
              f"{each.min():>6.2f} {accuracy:>6.3f}  {skipped}")  # fmt: skip


if __name__ == "__main__":
    main()
