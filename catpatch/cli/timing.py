"""Timings that cannot mislead: every speed-up a `catpatch` command prints is checked against
the arithmetic bound of its run (1 / the MACs ratio: no policy makes a run faster than the
arithmetic it removes), re-measured once when it exceeds it, and flagged if it still does.
One timed run is called "1 run", never a median.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

# A measured speed-up may exceed the bound by this much before it is called impossible
# (timer noise; a pruned step also moves fewer bytes than its MACs say).
TOLERANCE = 0.05


def runs_label(runs: int) -> str:
    """'1 run' or 'median of 3 runs'."""
    return "1 run" if runs == 1 else f"median of {runs} runs"


def impossible(speedup: float, bound: float) -> bool:
    """True when `speedup` is more than the arithmetic `bound` allows (with `TOLERANCE`)."""
    return bound > 0 and speedup > bound * (1 + TOLERANCE)


def bound_note(speedup: float, bound: float) -> str:
    """The warning for a speed-up above its bound; empty if it is possible."""
    if not impossible(speedup, bound):
        return ""
    return (
        f"the measured {speedup:.2f}x is more than the patched run's arithmetic allows here (at "
        f"most {bound:.2f}x): another load on this machine disturbed the timing, so it is not a "
        f"measurement of catpatch; rerun on an idle machine (or with more --repeats)"
    )


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_note(load: float | None, cores: int | None = None) -> str:
    """A warning when other programs already kept every core busy before timing began (load
    average >= cores): both sides then run at the scheduler's mercy, and the speed-up can
    come out anywhere, below the bound too. Empty otherwise."""
    cores = cores or os.cpu_count() or 1
    if load is None or load < cores:
        return ""
    return (
        f"this machine was busy before timing began (load average {load:.1f} on {cores} "
        f"cores): the timings measure the contention more than catpatch; rerun on an idle machine"
    )


@dataclass
class PairTiming:
    """Alternating timed runs of the unpatched and the patched side (whatever policy it
    runs), checked against `bound`."""

    bound: float
    unpatched_s: list[float] = field(default_factory=list)
    patched_s: list[float] = field(default_factory=list)
    remeasured: bool = False

    @property
    def runs(self) -> int:
        return min(len(self.unpatched_s), len(self.patched_s))

    @property
    def unpatched(self) -> float:
        return statistics.median(self.unpatched_s)

    @property
    def patched(self) -> float:
        return statistics.median(self.patched_s)

    @property
    def speedup(self) -> float:
        return self.unpatched / self.patched

    @property
    def plausible(self) -> bool:
        return not impossible(self.speedup, self.bound)

    def label(self) -> str:
        return runs_label(self.runs)

    def note(self) -> str:
        return bound_note(self.speedup, self.bound)


def time_pair(
    unpatched: Callable[[], float],
    patched: Callable[[], float],
    repeats: int,
    bound: float,
    retry: bool = True,
) -> PairTiming:
    """Time `repeats` runs of each side (each callable runs once and returns its seconds),
    alternating the order (U P, P U, ...) so that both sides see the same machine; both must be
    warm already. If the speed-up exceeds `bound`, time `max(repeats, 3)` more runs of each and
    report the medians of all of them (`remeasured`); `plausible` says whether that helped."""
    timing = PairTiming(bound=bound)

    def measure(count: int, start: int) -> None:
        for i in range(start, start + count):
            sides = [(timing.unpatched_s, unpatched), (timing.patched_s, patched)]
            for times, run in sides if i % 2 == 0 else sides[::-1]:
                times.append(run())

    measure(repeats, 0)
    if retry and repeats and not timing.plausible:
        timing.remeasured = True
        measure(max(repeats, 3), repeats)
    return timing
