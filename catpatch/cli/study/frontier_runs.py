"""The frontier study: at each MACs budget, catpatch's planned run against the best setting a
user tuning the other methods would find (`run_frontier`).

Two stages per step count, resumable from `rows.jsonl`:
1. **sweep**: every setting of the tunable methods (0.3.0's step reuse: warm-up, α and reuse
   order; diffusers' TaylorSeer lite and attention: order, interval, warm-up, whose warm-up
   also sets the phase of the interval; CAT) runs on the first `tune` captions;
2. **final**: at each budget, the setting of each method with the best mean PSNR on those
   captions among those that fit the budget (MACs at most budget + 0.01) runs on all the
   captions, and so does `CATConfig(macs=budget)` (fitted forecast and plain reuse).
The tuning captions are a subset of the evaluation captions: that favours the tuned methods.
The report pairs the planned run with the better of the tuned ones, image by image.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from ...config import CATConfig
from ...peers.taylorseer import TaylorSeer, apply_taylorseer, remove_taylorseer
from .runs import _reference, _run_peer, check_model, fidelity, generate_images

BUDGETS = (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75)
TUNED = ("step", "taylorseer-lite", "taylorseer", "cat")
PLANNED = ("planned", "planned-reuse", "planned+anchors")
# 0.3.0's default (step reuse, α 0.3, t0 8, first-order forecast), spelt out: what a new
# default must beat in every group by the rule (`examples/decide_defaults.py --budget`).
DEFAULT_030 = CATConfig(keep_ratio=0.3, warmup_steps=8, selection="step", reuse_order=1)
SLACK = 0.01  # a setting fits a budget when its MACs are at most budget + SLACK


GRIDS = {  # step reuse warm-ups, α; TaylorSeer-lite intervals, warm-ups; attention mode and CAT
    0: ((2, 3, 4, 6, 8), (0.05, 0.1, 0.15, 0.2, 0.3, 0.5), (2, 3, 4, 5, 6, 8), (1, 2, 3, 5), True),
    1: ((3, 4, 8), (0.05, 0.1, 0.2, 0.3, 0.5), (2, 3, 4, 6), (2, 3, 5), True),
    2: ((3, 8), (0.1, 0.2, 0.3, 0.5), (2, 3, 4, 6), (3, 5), False),
}


def sweep_settings(steps: int, small: int = 0) -> list[tuple[str, object]]:
    """(method, setting) of the sweep at `steps`; `small` 1 / 2: coarser grids for slow
    models (2 leaves out TaylorSeer's attention mode and CAT, which no budget chose)."""
    warmups, alphas, intervals, ts_warmups, others = GRIDS[int(small)]
    runs: list[tuple[str, object]] = []
    for t0 in warmups:
        if t0 >= steps - 1:
            continue
        for alpha in alphas:
            for order in (0, 1):
                config = CATConfig(keep_ratio=alpha, warmup_steps=t0, reuse_order=order)
                runs.append(("step", config))
    for order in (1, 2):
        for interval in intervals:
            for t0 in ts_warmups:
                runs.append(("taylorseer-lite", TaylorSeer(interval, t0, order, lite=True)))
        if others:
            for interval in (3, 6):
                runs.append(("taylorseer", TaylorSeer(interval, 3, order, lite=False)))
    for alpha in (0.1, 0.2, 0.3) if others else ():
        for t0 in (4, 8):
            if t0 < steps - 1:
                runs.append(("cat", CATConfig(keep_ratio=alpha, warmup_steps=t0, selection="cat")))
    return runs


def planned_settings(budget: float, methods=PLANNED) -> list[tuple[str, CATConfig]]:
    """catpatch's budgeted runs at `budget`: the default forecast, plain reuse, anchors."""
    runs = [
        ("planned", CATConfig(macs=budget)),
        ("planned-reuse", CATConfig(macs=budget, forecast="reuse")),
        ("planned+anchors", CATConfig(macs=budget, anchors=1)),
    ]
    return [r for r in runs if r[0] in methods]


def key_of(steps: int, method: str, setting: object, images: int) -> str:
    fields = ", ".join(
        f"{f.name}={getattr(setting, f.name)!r}"
        for f in dataclasses.fields(setting)
        if f.name != "calibration"
    )
    return f"{steps} {images} {method} {type(setting).__name__}({fields})"


def run_frontier(
    out: str | Path,
    model: str = "toy",
    steps_list: tuple[int, ...] = (28, 50),
    images: int = 64,
    tune: int = 16,
    budgets: tuple[float, ...] = BUDGETS,
    small: int = 0,
    stages: tuple[str, ...] = ("sweep", "planned", "final"),
    methods: tuple[str, ...] = PLANNED,
    log=print,
) -> list[dict]:
    """Run (or resume) the frontier study into `out`; returns every row."""
    from ... import cat_stats
    from ...patching import apply_cat, remove_cat
    from ...trained.detector import DETECTOR_FILE

    trained, folder = check_model(model)
    pipe = trained.load_pipeline(path=folder)
    detector = trained.load_detector(folder / DETECTOR_FILE if folder else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = _load(rows_path)
    prompts = trained.eval_prompts(images)
    labels = np.array([p.labels for p in prompts])
    joint = "+".join(trained.data.JOINT[0])
    unpatched_macs: dict[int, int] = {}

    def measure(steps: int, method: str, setting, count: int, refs) -> dict:
        key = key_of(steps, method, setting, count)
        if key in done:
            return done[key]
        start = time.perf_counter()
        part = prompts[:count]
        if isinstance(setting, TaylorSeer):
            _, imgs, macs = _run_peer(
                pipe, part, steps, 16, unpatched_macs, trained,
                lambda: apply_taylorseer(pipe, setting), lambda: remove_taylorseer(pipe),
            )  # fmt: skip
        else:
            apply_cat(pipe, setting)
            try:
                _, imgs = generate_images(pipe, part, steps, 16, trained)
                stats = cat_stats(pipe)
            finally:
                remove_cat(pipe)
            macs = stats.macs_ratio
        psnr, ssim = fidelity(imgs, refs[:count])
        acc = trained.score(detector, imgs, labels[:count])
        row = dict(
            key=key, steps=steps, images=count, method=method, setting=_describe(setting),
            macs=float(macs), psnr=float(psnr.mean()), psnr_min=float(psnr.min()),
            ssim=float(ssim.mean()), accuracy=float(acc[joint]),
            psnr_each=[float(v) for v in psnr], seconds=time.perf_counter() - start,
        )  # fmt: skip
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row
        log(f"{steps} steps {method} {row['setting']} ({count} images): MACs {macs:.3f}, "
            f"PSNR {row['psnr']:.2f} dB")  # fmt: skip
        return row

    for steps in steps_list:
        _, refs = _reference(
            out, images, steps, lambda s=steps: generate_images(pipe, prompts, s, 16, trained)
        )
        if "sweep" in stages:
            for method, setting in sweep_settings(steps, small):
                measure(steps, method, setting, tune, refs)
        if "planned" in stages:
            measure(steps, "default-0.3.0", DEFAULT_030, images, refs)
            for budget in budgets:
                for method, setting in planned_settings(budget, methods):
                    if math.floor(budget * steps + 1e-9) >= 2:
                        measure(steps, method, setting, images, refs)
        if "final" in stages:
            everything = sweep_settings(steps)  # any setting tuned so far, either grid
            for budget in budgets:
                for method in TUNED:
                    best = best_tuned(done, steps, method, budget, tune, everything)
                    if best is not None:
                        measure(steps, method, best, images, refs)
    return list(done.values())


def best_tuned(done: dict, steps: int, method: str, budget: float, tune: int, settings):
    """The setting of `method` with the best tuning PSNR among those within `budget`."""
    best, best_psnr = None, -math.inf
    for m, setting in settings:
        row = done.get(key_of(steps, m, setting, tune))
        if m != method or row is None or row["macs"] > budget + SLACK:
            continue
        if row["psnr"] > best_psnr:
            best, best_psnr = setting, row["psnr"]
    return best


def _describe(setting) -> str:
    if isinstance(setting, TaylorSeer):
        kind = "lite" if setting.lite else "attention"
        return (
            f"{kind} order {setting.max_order} interval {setting.cache_interval} "
            f"warm-up {setting.warmup_steps}"
        )
    if setting.budgeted:
        anchors = f" anchors {setting.anchors}" if setting.anchors else ""
        return f"macs {setting.macs:g} forecast {setting.forecast}{anchors}"
    return (
        f"{setting.selection} alpha {setting.keep_ratio:g} warm-up {setting.warmup_steps} "
        f"order {setting.reuse_order}"
    )


def _load(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in rows}
