"""The timing procedure of `catpatch bench`: both loops warmed up, then timed alternating, the
speed-up checked against the arithmetic bound (timed again, then flagged, when above it), and
an instrumented run for the per-step and selection times."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict

import torch

from ... import policies
from ...patching import apply_cat, get_patch
from ...stats import collect
from ..timing import busy_note, impossible, load_average
from .loop import Loop, _sync
from .report import BenchResult
from .settings import BenchSettings, bench_config, load_transformer


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _step_times(loop: Loop) -> tuple[float, float]:
    """Median full-step and pruned-step times (ms) from one run with a sync around every step
    (instrumented, so not part of the timed loops)."""
    device, state = loop.device, get_patch(loop.transformer).state
    modes: list[tuple[str, float]] = []
    forward = loop.forward

    def timed_forward(**kwargs):
        _sync(device)
        start = time.perf_counter()
        out = forward(**kwargs)
        _sync(device)
        modes.append((state.log.steps[-1].mode.value, time.perf_counter() - start))
        return out

    loop.forward = timed_forward
    try:
        loop()
    finally:
        loop.forward = forward
    return _median_ms([t for m, t in modes if m in ("full", "reference", "record")]), _median_ms(
        [t for m, t in modes if m == "pruned"]
    )


def _selection_time(loop: Loop, repeats: int = 20) -> float:
    """Median time (ms) of one per-step selection (eager), on the state a run leaves behind."""
    device, state = loop.device, get_patch(loop.transformer).state
    persistent, state.persistent = state.persistent, True  # keep the last step's state
    try:
        loop()
        output = state.drift(state.schedule.driver_rows(state.caches.previous))
        select = lambda: state.tokens.next(output, state.chosen)  # noqa: E731
        times = [_timed(select, device) for _ in range(repeats)]
    finally:
        state.persistent = persistent
        if not persistent:
            state.release()
    return _median_ms(times)


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else 0.0


def run(settings: BenchSettings) -> BenchResult:
    """Time the unpatched and the patched loop, alternating; see the package docstring."""
    load = load_average()  # before this run adds its own
    device = torch.device(settings.device)
    config = bench_config(settings)
    base = load_transformer(settings)
    patched = copy.deepcopy(base)
    if settings.compile != "none":
        # The same compile settings on both sides: regional (per block) compilation, catpatch's
        # (CATConfig.compile, with persistent buffers) and each block of the baseline in place.
        config = config.replace(compile=settings.compile)
        mode = None if settings.compile == "default" else settings.compile
        for block in (*base.transformer_blocks, *getattr(base, "single_transformer_blocks", ())):
            block.compile(mode=mode, dynamic=False)
    apply_cat(patched, config)
    loops = {"unpatched": Loop(base, settings), "patched": Loop(patched, settings)}
    if settings.compile != "none":  # also the plain eager pipeline a user starts from
        loops["eager"] = Loop(base, settings, eager=True)

    # warm-up: two runs each (compilation, allocator, the first run's recompiles per phase)
    for _ in range(2):
        for loop in loops.values():
            _timed(loop, device)

    peak_extra = None
    if device.type == "cuda":
        peaks = {}
        for name in ("unpatched", "patched"):
            loop = loops[name]
            torch.cuda.reset_peak_memory_stats(device)
            _timed(loop, device)
            peaks[name] = torch.cuda.max_memory_allocated(device)
        peak_extra = peaks["patched"] - peaks["unpatched"]

    times: dict[str, list[float]] = {name: [] for name in loops}

    def measure(repeats: int) -> None:
        for _ in range(repeats):
            for name, loop in loops.items():
                times[name].append(_timed(loop, device))

    measure(settings.repeats)
    stats = collect(get_patch(patched), patched)
    log = get_patch(patched).state.log
    geo = log.geometry
    full_steps = stats.steps - stats.pruned_steps - stats.reused_steps
    # N / (full + pruned·r), r a pruned step's cost by the family's cost model (for SD3 the
    # spec's (S+T)/(L+T)): a skipped step costs nothing in this bound
    ratio = 1 / get_patch(patched).adapter.cost_model().run_bound(
        1, 0, geo.tokens, geo.text_tokens, log.budget
    )
    bound = stats.steps / (full_steps + stats.pruned_steps * ratio)
    if config.budgeted:  # a planned run: its measured MACs (what the budget bounds)
        bound = stats.bound

    def speedup() -> float:
        return statistics.median(times["unpatched"]) / statistics.median(times["patched"])

    remeasured = impossible(speedup(), bound)
    if remeasured:  # a disturbed timing (another load on the machine): time more runs
        measure(max(settings.repeats, 3))
    full_ms, pruned_ms = _step_times(loops["patched"])
    select_ms = _selection_time(loops["patched"]) if stats.pruned_steps else 0.0
    patched_median = statistics.median(times["patched"])
    eager = times.get("eager")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return BenchResult(
        settings=asdict(settings),
        device_name=name,
        tokens=geo.tokens,
        budget=log.budget,
        rows=geo.rows,
        unpatched_s=times["unpatched"],
        patched_s=times["patched"],
        eager_unpatched_s=eager,
        speedup=speedup(),
        speedup_vs_eager=statistics.median(eager) / patched_median if eager else None,
        bound=bound,
        fraction_of_bound=speedup() / bound,
        macs_ratio=stats.macs_ratio,
        cache_bytes=log.cache_bytes,
        peak_extra_bytes=peak_extra,
        full_step_ms=full_ms,
        pruned_step_ms=pruned_ms,
        selection_ms=select_ms,
        selection_share=select_ms / pruned_ms if pruned_ms else 0.0,
        plausible=not impossible(speedup(), bound),
        remeasured=remeasured,
        steps_full=full_steps,
        steps_pruned=stats.pruned_steps,
        steps_skipped=stats.reused_steps,
        policy=policies.policy_label(config),
        computed_steps=stats.plan.describe() if stats.plan is not None else None,
        load_average_before=load,
        busy=busy_note(load) if device.type == "cpu" else "",
    )


def _cpu_name() -> str:
    import os
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
