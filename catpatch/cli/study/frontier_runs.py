"""The frontier study: at each MACs budget, catpatch's planned run against the best setting a
user tuning the other methods would find (`run_frontier`).

Two stages per step count, resumable from `rows.jsonl`:
1. **sweep**: every setting of the tunable methods (0.3.0's step reuse: warm-up, α and reuse
   order; diffusers' TaylorSeer lite and attention: order, interval, warm-up, whose warm-up
   also sets the phase of the interval; diffusers' MagCache, calibrated on 8 captions the study
   does not score: threshold, longest skip, retention; diffusers' FirstBlockCache: threshold;
   CAT) runs on the first `tune` captions;
2. **final**: at each budget, the setting of each method with the best mean PSNR on those
   captions among those that fit the budget (MACs at most budget + 0.01) runs on all the
   captions, and so does `CATConfig(macs=budget)` (the default forecast, plain reuse, anchors).
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
from ...peers.firstblock import FirstBlockCache, apply_firstblock, remove_firstblock
from ...peers.magcache import MagCache, apply_magcache, remove_magcache
from ...peers.taylorseer import TaylorSeer, apply_taylorseer, remove_taylorseer
from ...stats import measured_macs
from .methods import MAGCACHE_CALIBRATION_IMAGES, MODEL
from .runs import _calibrate, _reference, _run_peer, check_model, fidelity, generate_images

BUDGETS = (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75)
TUNED = ("step", "taylorseer-lite", "taylorseer", "magcache", "firstblock", "cat")
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
# MagCache: thresholds (diffusers' default 0.06), longest skips (default 3), retention ratios
# (default 0.2; 0.1 leaves room for the smallest budgets); the coarsest sweep has fewer
MAGCACHE_GRID = ((0.06, 0.12, 0.24, 0.5, 1.0), (3, 6, 12), (0.1, 0.2))
MAGCACHE_SMALL = ((0.12, 0.24, 0.5, 1.0), (3, 12), (0.1, 0.2))
FIRSTBLOCK_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)  # diffusers' docs suggest 0.05-0.2


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
    thresholds, skips, retentions = MAGCACHE_SMALL if small == 2 else MAGCACHE_GRID
    for threshold in thresholds:
        for skip in skips:
            for retention in retentions:
                runs.append(("magcache", MagCache(threshold, skip, retention, steps)))
    for threshold in FIRSTBLOCK_THRESHOLDS:
        runs.append(("firstblock", FirstBlockCache(threshold)))
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
    """A run's key in `rows.jsonl`: what the study varies, as the report names it (stable when
    the settings classes gain fields)."""
    return row_key(dict(steps=steps, images=images, method=method, setting=_describe(setting)))


def row_key(row: dict) -> str:
    return f"{row['steps']} {row['images']} {row['method']} {row['setting']}"


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
    ratios: dict[int, list[float]] = {}  # MagCache's, per step count

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
        elif isinstance(setting, MagCache):
            if steps not in ratios:  # calibrated on captions the study does not score
                extra = trained.eval_prompts(images + MAGCACHE_CALIBRATION_IMAGES)[images:]
                ratios[steps] = _calibrate(pipe, extra, steps, trained)
            calibrated = dataclasses.replace(setting, mag_ratios=ratios[steps])
            imgs, macs = _run_adaptive(
                pipe, part, steps, trained, unpatched_macs,
                lambda: apply_magcache(pipe, calibrated), lambda: remove_magcache(pipe),
            )  # fmt: skip
        elif isinstance(setting, FirstBlockCache):
            imgs, macs = _run_adaptive(
                pipe, part, steps, trained, unpatched_macs,
                lambda: apply_firstblock(pipe, setting), lambda: remove_firstblock(pipe),
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


def _run_adaptive(pipe, part, steps, trained, unpatched: dict, apply, remove):
    """Images and MACs ratio of a peer that decides per batch what to skip (MagCache,
    FirstBlockCache): the MACs are counted over the whole run, not on one caption."""
    if steps not in unpatched:
        unpatched[steps] = measured_macs(
            lambda: generate_images(pipe, part[:1], steps, model=trained), MODEL
        )
    out = {}
    apply()
    try:
        total = measured_macs(
            lambda: out.setdefault("imgs", generate_images(pipe, part, steps, 16, trained)[1]),
            MODEL,
        )
    finally:
        remove()
    return out["imgs"], total / (unpatched[steps] * len(part))


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
    if isinstance(setting, MagCache):
        return (
            f"threshold {setting.threshold:g} max skip {setting.max_skip_steps} "
            f"retention {setting.retention_ratio:g}"
        )
    if isinstance(setting, FirstBlockCache):
        return f"threshold {setting.threshold:g}"
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
    return {row_key(r): r for r in rows}
