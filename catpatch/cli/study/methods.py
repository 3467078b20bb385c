"""The study's methods and the configurations it runs (`configurations`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config import CATConfig
from ...peers.magcache import MagCache
from ...peers.taylorseer import TaylorSeer

if TYPE_CHECKING:
    from .rows import Row


def _method(selection: str, **fields) -> dict:
    """A method's CATConfig fields, spelt out in full: the study runs the same thing whatever
    the defaults are (the defaults are what it decides)."""
    return dict(selection=selection, lean=True, token_order=0, reuse_order=0) | fields


# Token policies: run at every keep ratio, all at the same MACs.
TOKEN_METHODS: dict[str, dict] = {
    "cat": _method("cat"),
    "cat+forecast": _method("cat", token_order=1),
    # The reference's rules as it runs them: its dense drift estimate too (`CATConfig.paper()`).
    "paper": _method("paper", lean=False),
    "paper+forecast": _method("paper", lean=False, token_order=1),
    "random": _method("random"),
    "noise": _method("noise"),
    "stale": _method("stale"),
}
STEP_METHODS: dict[str, dict] = {
    "step": _method("step"),
    "step+forecast": _method("step", reuse_order=1),
}
COMBINED_METHODS: dict[str, dict] = {
    "cat+reuse": _method("cat+reuse"),
    "cat+reuse+forecast": _method("cat+reuse", reuse_order=1, token_order=1),
}
QUICK_METHODS = ("cat", "random", "noise", "stale", "step")
FIRST_METHODS = ("cat", "stale", "step", "step+forecast")  # run first in the full study
PEERS = ("taylorseer", "taylorseer-lite", "magcache")  # diffusers' own caches
METHODS = (*TOKEN_METHODS, *STEP_METHODS, *COMBINED_METHODS, *PEERS)
CATPATCH_METHODS = (*TOKEN_METHODS, *STEP_METHODS, *COMBINED_METHODS)
STEPS = (28, 50)
KEEP_RATIOS = (0.2, 0.3, 0.5)
LOW_STEP_KEEP_RATIOS = (0.05, 0.1)  # step reuse below CAT's MACs, for the combined policy
REUSE_MACS = (0.4, 0.5, 0.6)
TAYLORSEER_INTERVALS = (2, 3, 4)
# MagCache thresholds (diffusers' default 0.06): MACs about 0.5 / 0.43 / 0.40 on the toy at 28
# steps. Its ratios are calibrated per step count on 8 captions the study does not score.
MAGCACHE_THRESHOLDS = (0.06, 0.12, 0.24)
MAGCACHE_CALIBRATION_IMAGES = 8
WARMUP_SWEEP = (4, 6, 10, 12)
CLUSTER_SWEEP = (5, 10, 40)
MODEL = "SD3Transformer2DModel"  # whose MACs are counted
PLANNED = "planned"  # `catpatch study --macs B`: CATConfig(macs=B) (`planned_runs`)

Setting = CATConfig | TaylorSeer | MagCache


def configurations(quick: bool = False) -> list[tuple[int, str, Setting]]:
    """(steps, method, settings) of every run of the study; `quick` keeps a small subset
    (28 steps, α 0.3, the token ablations and step reuse)."""
    if quick:
        methods = {**TOKEN_METHODS, **STEP_METHODS}
        return [(28, m, CATConfig(keep_ratio=0.3, **methods[m])) for m in QUICK_METHODS]
    runs: list[tuple[int, str, Setting]] = []
    for steps in STEPS:
        for keep in KEEP_RATIOS:
            for method, fields in {**TOKEN_METHODS, **STEP_METHODS}.items():
                runs.append((steps, method, CATConfig(keep_ratio=keep, **fields)))
        for keep in LOW_STEP_KEEP_RATIOS:
            for method, fields in STEP_METHODS.items():
                runs.append((steps, method, CATConfig(keep_ratio=keep, **fields)))
        for macs in REUSE_MACS:
            for method, fields in COMBINED_METHODS.items():
                runs.append((steps, method, CATConfig(reuse_macs=macs, **fields)))
        for interval in TAYLORSEER_INTERVALS:
            for lite in (False, True):
                method = "taylorseer-lite" if lite else "taylorseer"
                runs.append((steps, method, TaylorSeer(cache_interval=interval, lite=lite)))
        for threshold in MAGCACHE_THRESHOLDS:
            runs.append(
                (steps, "magcache", MagCache(threshold=threshold, num_inference_steps=steps))
            )
    for t0 in WARMUP_SWEEP:
        runs.append((28, "cat", CATConfig(**TOKEN_METHODS["cat"], warmup_steps=t0)))
    for clusters in CLUSTER_SWEEP:
        runs.append((28, "cat", CATConfig(**TOKEN_METHODS["cat"], num_clusters=clusters)))
    # The full study takes hours on a CPU: the comparisons the defaults rest on run first, so
    # an interrupted study (resumed later) already answers them in every (steps, α) group.
    first = [r for r in runs if r[1] in FIRST_METHODS and _in_grid(r[2])]
    return first + [r for r in runs if r not in first]


def planned_runs(config: CATConfig, quick: bool = False) -> list[tuple[int, str, Setting]]:
    """`catpatch study --macs B`: the budgeted method (`config`, a `CATConfig(macs=B)`) at
    every step count of the study (28 only with `quick`), under the name `PLANNED`."""
    return [(steps, PLANNED, config) for steps in ((28,) if quick else STEPS)]


def _in_grid(config: Setting) -> bool:
    """A run of the (steps, α) grid at the default warm-up and cluster count."""
    defaults = CATConfig()
    return (
        isinstance(config, CATConfig)
        and config.keep_ratio in KEEP_RATIOS
        and (config.warmup_steps, config.num_clusters)
        == (defaults.warmup_steps, defaults.num_clusters)
    )


def in_sweep(row: Row) -> bool:
    """A row of the t0 / cluster sweeps (CAT away from the default warm-up or clusters)."""
    defaults = CATConfig()
    return row.method == "cat" and (
        row.warmup_steps != defaults.warmup_steps or row.num_clusters != defaults.num_clusters
    )
