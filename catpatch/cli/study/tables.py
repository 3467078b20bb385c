"""The study's tables: `study.csv`, `study.json`, `study.md` (every run) and `targets.md`
(each catpatch method against its peers at equal MACs); `write_outputs` writes them all and
the plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ... import __version__
from ...config import CATConfig
from ..common import plural
from .methods import (
    CATPATCH_METHODS,
    COMBINED_METHODS,
    KEEP_RATIOS,
    PEERS,
    PLANNED,
    STEP_METHODS,
    in_sweep,
)
from .plot import plot
from .rows import Row


def write_outputs(out: Path, rows: list[Row], images: int) -> None:
    """Write every output of the study into `out`: the tables and `study.png`."""
    fields = list(rows[0].table())
    with open(out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r.table() for r in rows)
    (out / "study.md").write_text(markdown_table(rows, images))
    table = [{**r.table(), "catpatch_version": __version__} for r in rows]
    (out / "study.json").write_text(json.dumps(table, indent=1))
    (out / "targets.md").write_text(targets(rows))
    plot(rows, out / "study.png")


def _paired(a: Row, b: Row) -> tuple[float, float]:
    """Mean PSNR difference a − b over the same images and its standard error."""
    d = np.asarray(a.psnr_each) - np.asarray(b.psnr_each)
    finite = d[np.isfinite(d)]
    if finite.size < 2:
        return float(a.psnr - b.psnr), float("nan")
    return float(finite.mean()), float(finite.std(ddof=1) / np.sqrt(finite.size))


def _difference(a: Row, b: Row) -> str:
    mean, se = _paired(a, b)
    return f"{mean:+.2f} ± {se:.2f}"


def _interpolate(rows: list[Row], macs: float) -> float | None:
    """PSNR of a method's curve at `macs` (linear between its runs; None outside them)."""
    points = sorted((r.macs_ratio, r.psnr) for r in rows)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= macs <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (macs - x0) / (x1 - x0)
    return None


def targets(rows: list[Row]) -> str:
    """The study's comparisons as markdown: each catpatch method against its peers at equal
    MACs, with paired standard errors where the MACs are the same. A comparison whose methods
    the study did not run (`--quick`) says so in one line instead of an empty table."""
    # CAT's token policy at the default token forecast order (the default *policy* is step
    # reuse since 0.3.0: `decide` compares every policy with it)
    default = "cat" if CATConfig().token_order == 0 else "cat+forecast"
    main = [r for r in rows if not in_sweep(r) and r.method != "unpatched"]
    out = [
        f"catpatch {__version__}. CAT's token policy: `{default}`. Differences in dB PSNR "
        f"± standard error.\n"
    ]

    def find(steps, method, keep=None):
        found = [r for r in main if r.steps == steps and r.method == method]
        return next((r for r in found if keep is None or r.keep_ratio == keep), None)

    def table(title: str, header: list[str], lines: list[str], missing: str) -> None:
        out.append(f"\n{title}\n")
        if not lines:
            out.append(f"Not in this study: {missing}.")
            return
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out.extend(lines)

    lines = []
    for steps in sorted({r.steps for r in main}):
        for keep in KEEP_RATIOS:
            base = find(steps, default, keep)
            if base is None:
                continue
            cells = []
            for peer in ("random", "noise", "stale"):
                other = find(steps, peer, keep)
                cells.append("-" if other is None else _difference(base, other))
            zeroth = find(steps, default.replace("+forecast", ""), keep)
            forecast = find(steps, default.split("+")[0] + "+forecast", keep)
            gain = "-" if not (zeroth and forecast) else _difference(forecast, zeroth)
            lines.append(
                f"| {steps} | {keep:g} | {base.macs_ratio:.3f} | "
                + " | ".join(cells)
                + f" | {gain} |"
            )
    table(
        "CAT's token policy against the ablations at the same MACs:",
        ["steps", "α", "MACs", "CAT − random", "− noise", "− stale", "forecast gain"],
        lines,
        f"no `{default}` run",
    )
    lines = []
    for r in (r for r in main if r.method in COMBINED_METHODS):
        curves = [[s for s in main if s.steps == r.steps and s.method == m] for m in STEP_METHODS]
        peers = [v for v in (_interpolate(c, r.macs_ratio) for c in curves) if v is not None]
        peer = max(peers) if peers else None
        margin = "-" if peer is None else f"{r.psnr - peer:+.2f}"
        shown = "-" if peer is None else f"{peer:.2f}"
        lines.append(
            f"| {r.steps} | {r.method} | {r.macs_ratio:.3f} | {r.psnr:.2f} | {shown} | {margin} |"
        )
    table(
        "Combined policy against step reuse (the better of `step` / `step+forecast`, "
        "interpolated at the same MACs):",
        ["steps", "method", "MACs", "PSNR", "step reuse at these MACs", "margin"],
        lines,
        "no `cat+reuse` run (the full study has them; `--quick` does not)",
    )
    planned = [r for r in main if r.method == PLANNED]
    if planned:  # `catpatch study --macs B`
        lines = []
        for r in planned:
            same = [s for s in main if s.steps == r.steps]
            curves = [[s for s in same if s.method == m] for m in STEP_METHODS]
            peers = [v for v in (_interpolate(c, r.macs_ratio) for c in curves) if v is not None]
            peer = max(peers) if peers else None
            margin = "-" if peer is None else f"{r.psnr - peer:+.2f}"
            shown = "-" if peer is None else f"{peer:.2f}"
            lines.append(
                f"| {r.steps} | {r.setting} | {r.macs_ratio:.3f} | {r.psnr:.2f} | {shown} | "
                f"{margin} |"
            )
        table(
            "The budgeted policy (`--macs`) against step reuse (the better of `step` / "
            "`step+forecast`, interpolated at the same MACs; `-`: no step reuse runs around "
            "these MACs):",
            ["steps", "planned", "MACs", "PSNR", "step reuse at these MACs", "margin"],
            lines,
            "no `planned` run",
        )
    lines = []
    for r in (r for r in main if r.method in PEERS):
        ours = [c for c in main if c.steps == r.steps and c.method in CATPATCH_METHODS]
        cheaper = [c for c in ours if c.macs_ratio <= r.macs_ratio + 1e-9]
        best = max(cheaper, key=lambda c: c.psnr, default=None)
        if best is None:
            lines.append(
                f"| {r.steps} | {r.method} {r.setting} | {r.macs_ratio:.3f} | "
                f"{r.psnr:.2f} | none at these MACs | - |"
            )
            continue
        lines.append(
            f"| {r.steps} | {r.method} {r.setting} | {r.macs_ratio:.3f} | {r.psnr:.2f} | "
            f"{best.psnr:.2f} ({best.method} {best.setting or f'α {best.keep_ratio:g}'}, "
            f"{best.macs_ratio:.3f}) | {best.psnr - r.psnr:+.2f} |"
        )
    table(
        "diffusers' caches (TaylorSeerCache, MagCache) against catpatch's best run at no more "
        "MACs:",
        ["steps", "peer", "MACs", "PSNR", "catpatch best (method, MACs)", "margin"],
        lines,
        "no TaylorSeerCache or MagCache run (the full study has them; `--quick` does not)",
    )
    out.append(
        "\nCaption following (detector: the label pair right, colour and position on the toy, "
        "left and right objects on scenes) below unpatched by "
        "more than two binomial standard errors:\n"
    )
    for steps in sorted({r.steps for r in main}):
        reference = next(r for r in rows if r.steps == steps and r.method == "unpatched")
        p = reference.accuracy_colour_position
        n = max((len(r.psnr_each) for r in main), default=1) or 1
        noise = 2 * np.sqrt(max(p * (1 - p), 1 / n) / n)
        low = [r for r in main if r.steps == steps and r.accuracy_colour_position < p - noise]
        names = ", ".join(f"{r.method} {r.setting or f'α {r.keep_ratio:g}'}" for r in low)
        out.append(f"- {steps} steps (unpatched {p:.3f}, 2 SE {noise:.3f}): {names or 'none'}")
    return "\n".join(out) + "\n"


def markdown_table(rows: list[Row], images: int) -> str:
    """`study.md`: one line per run."""
    head = (
        f"| steps | method | α | t0 | C | MACs | PSNR dB (min) | SSIM | latent err | "
        f"acc pair | acc all | setting |\n|{'---|' * 12}\n"
    )
    lines = []
    for r in rows:
        psnr = "∞" if r.method == "unpatched" else f"{r.psnr:.2f} ({r.psnr_min:.1f})"
        lines.append(
            f"| {r.steps} | {r.method} | {r.keep_ratio:g} | {r.warmup_steps} | "
            f"{r.num_clusters or '-'} | {r.macs_ratio:.3f} | {psnr} | {r.ssim:.4f} | "
            f"{r.latent_error:.4f} | {r.accuracy_colour_position:.3f} | {r.accuracy_all:.3f} | "
            f"{r.setting} |"
        )
    intro = f"catpatch {__version__}; {plural(images, 'image')} per configuration.\n\n"
    return intro + head + "\n".join(lines) + "\n"
