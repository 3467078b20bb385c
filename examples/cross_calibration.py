"""How much a foreign calibration costs: the toy planned from its own calibration and from the
scenes model's (what a model without one falls back to), PSNR against the unpatched images.

    python examples/cross_calibration.py --images 16 --steps 28
"""

from __future__ import annotations

import argparse
import warnings

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat
from catpatch import trained as shipped
from catpatch.calibration import builtin_path
from catpatch.cli.study.runs import fidelity, generate_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    toy = shipped.get("toy")
    pipe = toy.load_pipeline()
    prompts = toy.eval_prompts(args.images)
    _, reference = generate_images(pipe, prompts, args.steps, model=toy)
    for budget in args.budgets:
        for name, calibration in (("scenes'", builtin_path()), ("its own", None)):
            apply_cat(pipe, CATConfig(macs=budget, calibration=calibration))
            _, images = generate_images(pipe, prompts, args.steps, model=toy)
            plan = cat_stats(pipe).plan
            remove_cat(pipe)
            psnr, _ = fidelity(images, reference)
            print(
                f"toy, macs {budget:g}, {name} calibration: PSNR {psnr.mean():.2f} dB "
                f"(worst {psnr.min():.2f}), computed steps {plan.describe()}"
            )


if __name__ == "__main__":
    main()
