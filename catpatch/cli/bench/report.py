"""What `catpatch bench` reports: `BenchResult`, printed as a table or JSON."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from ... import __version__, policies
from ..common import cluster_selections
from ..timing import bound_note, runs_label


@dataclass
class BenchResult:
    settings: dict[str, Any]
    device_name: str
    tokens: int
    budget: int
    rows: int
    unpatched_s: list[float] = field(default_factory=list)
    patched_s: list[float] = field(default_factory=list)
    eager_unpatched_s: list[float] | None = None  # compiled runs: the uncompiled baseline
    speedup: float = 0.0
    speedup_vs_eager: float | None = None
    bound: float = 0.0
    fraction_of_bound: float = 0.0
    macs_ratio: float = 0.0
    cache_bytes: int = 0
    peak_extra_bytes: int | None = None
    full_step_ms: float = 0.0
    pruned_step_ms: float = 0.0
    selection_ms: float = 0.0
    selection_share: float = 0.0
    plausible: bool = True  # the speed-up is within the arithmetic bound (+5%)
    remeasured: bool = False  # it was not at first: more runs were timed
    steps_full: int = 0  # the patched loop's steps by mode: full (and recording), pruned, skipped
    steps_pruned: int = 0
    steps_skipped: int = 0
    policy: str = ""  # what the patched side ran, in words ("planned steps (MACs 0.4)", ...)
    computed_steps: str | None = None  # a budgeted run (--macs): its plan's, counted from 1
    catpatch_version: str = __version__
    load_average_before: float | None = None  # 1-minute load average when timing began
    busy: str = ""  # the warning when that load already filled every core

    def table(self) -> str:
        s = self.settings
        runs = runs_label(len(self.patched_s))
        name = self.policy or policies.label(s["selection"])
        clusters = s["selection"] in cluster_selections() and s.get("macs") is None
        if s.get("macs") is not None:
            policy = (
                f"{name} (--macs {s['macs']:g}, --forecast {s['forecast']}): computed steps "
                f"{self.computed_steps}"
            )
        else:
            policy = (
                f"{name} (--selection {s['selection']}): keep_ratio {s['keep_ratio']} "
                f"(S={self.budget}), warmup {s['warmup_steps']}"
                + (f", {s['num_clusters']} clusters" if clusters else "")
            )
        rows = [
            ("device", self.device_name),
            ("model", s["model"] or f"{s['shape']} (random weights)"),
            (
                "run",
                f"{s['height']}x{s['width']} ({self.tokens} tokens), {s['steps']} steps, "
                f"batch {s['batch']}{' + CFG' if s['cfg'] else ''} ({self.rows} rows), "
                f"{s['dtype']}, compile={s['compile']}",
            ),
            ("policy", policy),
            ("catpatch", self.catpatch_version),
            (f"loop unpatched ({runs})", f"{statistics.median(self.unpatched_s) * 1e3:.1f} ms"),
            (f"loop {name} ({runs})", f"{statistics.median(self.patched_s) * 1e3:.1f} ms"),
            (
                "speed-up",
                f"{self.speedup:.2f}x"
                + ("" if self.plausible else "  IMPOSSIBLE: above the bound, see the warning"),
            ),
            *(
                [("speed-up vs eager unpatched", f"{self.speedup_vs_eager:.2f}x")]
                if self.speedup_vs_eager
                else []
            ),
            ("arithmetic bound", f"{self.bound:.2f}x  (reached {self.fraction_of_bound:.0%})"),
            (
                "steps full / pruned / skipped",
                f"{self.steps_full} / {self.steps_pruned} / {self.steps_skipped}",
            ),
            (
                "MACs ratio",
                f"{self.macs_ratio:.3f}"
                + (f" (budget {s['macs']:g})" if s.get("macs") is not None else ""),
            ),
            ("full / pruned step", f"{self.full_step_ms:.1f} / {self.pruned_step_ms:.1f} ms"),
            (
                "selection per pruned step",
                f"{self.selection_ms:.2f} ms ({self.selection_share:.1%} of the step)",
            ),
            ("cache memory", f"{self.cache_bytes / 2**20:.1f} MiB"),
        ]
        if self.peak_extra_bytes is not None:
            rows.append(("extra peak memory", f"{self.peak_extra_bytes / 2**20:.1f} MiB"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def note(self) -> str:
        """The warning for an impossible speed-up; empty if the timing is plausible."""
        return bound_note(self.speedup, self.bound)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)
