"""Calibrate the shipped models for the planner (`CATConfig(macs=...)`) and store each
calibration beside its weights, where `apply_cat` finds it.

    python examples/calibrate_models.py [toy scenes]

Each model runs unpatched at 100 steps on 8 captions that the studies do not score (the
evaluation list's captions 64-71, as MagCache's calibration uses), recording the transformer's
outputs (`catpatch.calibrate`).
"""

from __future__ import annotations

import sys
import time

from catpatch import trained as shipped
from catpatch.calibration import CALIBRATION_FILE, calibrate

HELD_OUT = slice(64, 72)  # captions the studies (64 images) never score
STEPS = 100


def main(names: list[str]) -> None:
    for name in names or ["toy", "scenes"]:
        trained = shipped.get(name)
        pipe = trained.load_pipeline()
        cases = trained.eval_prompts(HELD_OUT.stop)[HELD_OUT]
        kwargs = {k: v for k, v in trained.call_kwargs.items() if k != "num_inference_steps"}
        start = time.perf_counter()
        calibration = calibrate(
            pipe, [c.prompt for c in cases], STEPS, seeds=[c.seed for c in cases], **kwargs
        )
        path = calibration.save(trained.weights_dir() / CALIBRATION_FILE)
        print(f"{name}: {calibration} -> {path} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
