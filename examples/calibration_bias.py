"""How far the planner's calibration (a fine run interpolated in σ) is from a run's own outputs:
the forecast errors of orders 1 and 2, interpolated against exact, over short gaps.

    python examples/calibration_bias.py [--models toy scenes] [--steps 28 50] [--fine 200]

For each model and step count, the shipped calibration (100 steps, captions 64-71) is
interpolated to the run's σ and compared with an exact calibration of the same captions at that
step count. For each skipped step j with history (j-g, j-2g, j-3g) (gap g), the squared error of
the reuse / order-1 / order-2 forecast is computed on both Gram matrices; the table gives the
median over steps of interpolated / exact for each order. Below 1: the calibration
underestimates that forecast's error (why `planner.AUTO_MARGIN` asks a higher order to beat the
lower one by a margin). `--fine N` also checks a calibration on an N-step grid.
"""

from __future__ import annotations

import argparse

import numpy as np

from catpatch import trained as shipped
from catpatch.calibration import Calibration, calibrate
from catpatch.planner import _Search

HELD_OUT = slice(64, 72)  # the shipped calibration's captions (examples/calibrate_models.py)
KINDS = ("reuse", "taylor1", "taylor2")


def ratios(exact: Calibration, other: Calibration, guidance: float, gap: int) -> np.ndarray:
    """Median over steps of other / exact squared forecast error, per order in `KINDS`."""
    sigmas = np.append(exact.sigmas, 0.0)
    grams = exact.guided(guidance), other.gram(sigmas, guidance)
    rows = []
    for j in range(3 * gap + 3, len(exact.sigmas)):
        history = (j - gap, j - 2 * gap, j - 3 * gap)
        errors = []
        for gram in grams:
            search = _Search(gram, sigmas, "auto")
            errors.append(
                [search._step_error(j, history, search._taylor(j, history, k)) for k in KINDS]
            )
        rows.append(np.array(errors[1]) / np.array(errors[0]))
    return np.median(np.array(rows), axis=0)


def exact_run(trained, pipe, steps: int) -> Calibration:
    """A calibration of the shipped one's captions at `steps` (the run's own σ)."""
    cases = trained.eval_prompts(HELD_OUT.stop)[HELD_OUT]
    kwargs = {k: v for k, v in trained.call_kwargs.items() if k != "num_inference_steps"}
    prompts, seeds = [c.prompt for c in cases], [c.seed for c in cases]
    return calibrate(pipe, prompts, steps, seeds=seeds, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["toy", "scenes"])
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    parser.add_argument("--fine", type=int, default=0, help="also a calibration at N steps")
    args = parser.parse_args()
    for name in args.models:
        trained = shipped.get(name)
        pipe = trained.load_pipeline()
        grids = {"shipped (100 steps)": Calibration.load(trained.weights_dir())}
        if args.fine:
            grids[f"{args.fine} steps"] = exact_run(trained, pipe, args.fine)
        for steps in args.steps:
            exact = exact_run(trained, pipe, steps)
            for label, calibration in grids.items():
                cells = []
                for gap in (1, 2, 3, 5):
                    r = ratios(exact, calibration, trained.guidance_scale, gap)
                    cells.append(f"gap {gap}: " + " ".join(f"{v:.2f}" for v in r))
                print(f"{name} {steps} steps, {label}: interpolated / exact (reuse, order 1, "
                      f"order 2)  " + " | ".join(cells), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
