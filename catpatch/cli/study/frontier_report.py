"""The frontier study's report: per step count and budget, the planned run against the best
tuned setting of each method, paired image by image (`write_report`)."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np

from .frontier_runs import BUDGETS, PLANNED, SLACK, TUNED, row_key

NAMES = {
    "planned": "catpatch `macs=B`",
    "planned-reuse": "`macs=B`, forecast reuse",
    "planned+anchors": "`macs=B`, 1 anchor per cluster",
    "step": "step reuse 0.3.0 (tuned)",
    "taylorseer-lite": "TaylorSeer lite (tuned)",
    "taylorseer": "TaylorSeer attention (tuned)",
    "magcache": "MagCache (calibrated, tuned)",
    "firstblock": "FirstBlockCache (tuned)",
    "cat": "CAT (tuned)",
}
# what the planned run must beat (CAT is reported, never the best)
PEERS = ("step", "taylorseer-lite", "taylorseer", "magcache", "firstblock")


def load_rows(out: Path) -> list[dict]:
    path = Path(out) / "rows.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return list({row_key(r): r for r in map(json.loads, filter(None, lines))}.values())


def pick(rows: list[dict], steps: int, images: int, method: str, budget: float) -> dict | None:
    """The row of `method` at `budget`: the planned run of that budget, or the final run (all
    images) of the tuned setting with the best tuning PSNR among those within the budget."""
    finals = [r for r in rows if r["steps"] == steps and r["images"] == images]
    if method in PLANNED:
        for r in finals:
            if r["method"] == method and r["setting"].startswith(f"macs {budget:g} "):
                return r
        return None
    if method == "default-0.3.0":
        return next((r for r in finals if r["method"] == method), None)
    tuning = {  # a setting's tuning run, by what it varies (keys changed form in 0.4.1)
        r["setting"]: r
        for r in rows
        if r["steps"] == steps and r["images"] < images and r["method"] == method
    }
    candidates = [
        r for r in finals if r["method"] == method and r["macs"] <= budget + SLACK
        and r["setting"] in tuning
    ]  # fmt: skip
    if not candidates:
        return None
    return max(candidates, key=lambda r: tuning[r["setting"]]["psnr"])


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean and standard error of a's PSNR minus b's, image by image."""
    diff = np.array(a["psnr_each"]) - np.array(b["psnr_each"])
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def verdict(planned: dict | None, best: dict | None, peers: list[dict] = ()) -> str:
    """The issue's test: at least 1 dB and more than 2 SE above the best peer's mean, and a
    worst image no worse than the best peer's nor any other chosen peer's (`peers`)."""
    if planned is None or best is None:
        return "n/a"
    mean, se = paired(planned, best)
    worst = all(planned["psnr_min"] >= p["psnr_min"] for p in (best, *peers))
    if mean >= 1.0 and mean > 2 * se and worst:
        return "**met**"
    why = []
    if mean < 1.0 or mean <= 2 * se:
        why.append("under 1 dB / 2 SE")
    if not worst:
        why.append("worse worst image")
    return "not met: " + ", ".join(why)


def table(rows: list[dict], steps: int, images: int, budgets) -> list[str]:
    head = (
        "| budget (bound) | method | setting | MACs | PSNR mean | worst | SSIM | caption | "
        "planned − this (dB ± SE) |"
    )
    lines = [head, "|" + "---|" * 9]
    verdicts = []
    for budget in budgets:
        planned = pick(rows, steps, images, "planned", budget)
        chosen = {m: pick(rows, steps, images, m, budget) for m in (*PLANNED, *TUNED)}
        for method, row in chosen.items():
            if row is None:
                continue
            diff = ""
            if planned is not None and row is not planned:
                mean, se = paired(planned, row)
                diff = f"{mean:+.2f} ± {se:.2f}"
            lines.append(
                f"| {budget:g} ({1 / budget:.2f}x) | {NAMES[method]} | {row['setting']} | "
                f"{row['macs']:.3f} | {row['psnr']:.2f} | {row['psnr_min']:.2f} | "
                f"{row['ssim']:.4f} | {row['accuracy']:.2f} | {diff} |"
            )
        peers = [chosen[m] for m in PEERS if chosen.get(m) is not None]
        best = max(peers, key=lambda r: r["psnr"]) if peers else None
        verdicts.append(
            f"- budget {budget:g}: planned "
            + (f"{planned['psnr']:.2f} dB" if planned else "not run")
            + (f" vs best tuned {NAMES[best['method']]} {best['psnr']:.2f} dB" if best else "")
            + f": {verdict(planned, best, peers)}"
        )
    return lines + ["", *verdicts]


def write_report(
    out: str | Path, model: str, steps_list=(28, 50), images: int = 64, budgets=BUDGETS
) -> Path:
    """Write `frontier.md` (tables and verdicts) and `frontier.png` (the frontier per step
    count) from the rows in `out`."""
    out = Path(out)
    rows = load_rows(out)
    parts = [
        f"# Frontier study: {model}",
        "",
        "PSNR (dB) of each image against the unpatched image of the same caption and seed, "
        f"{images} captions; the tuned methods' settings were chosen on the first captions "
        "of the same list (their best mean PSNR among the settings within the budget + "
        f"{SLACK}); 'planned − this' pairs the images. Verdict: the planned run at least 1 dB "
        "and more than 2 SE above the best tuned peer (step reuse, TaylorSeer, MagCache, "
        "FirstBlockCache), with a worst image no worse than any tuned peer's.",
    ]
    for steps in steps_list:
        parts += ["", f"## {steps} steps", "", *table(rows, steps, images, budgets)]
    path = out / "frontier.md"
    path.write_text("\n".join(parts) + "\n")
    _plot(rows, out / "frontier.png", model, steps_list, images, budgets)
    return path


def _plot(rows, path: Path, model: str, steps_list, images: int, budgets) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(steps_list), figsize=(6 * len(steps_list), 4.5), squeeze=False)
    for ax, steps in zip(axes[0], steps_list, strict=True):
        for method in (*PLANNED, *TUNED):
            points = {}
            for budget in budgets:
                row = pick(rows, steps, images, method, budget)
                if row is not None:
                    points[row["key"]] = (row["macs"], row["psnr"])
            if points:
                xs, ys = zip(*sorted(points.values()), strict=True)
                ax.plot(xs, ys, marker="o", label=NAMES[method])
        sweep = [r for r in rows if r["steps"] == steps and r["images"] < images]
        if sweep:
            ax.scatter([r["macs"] for r in sweep], [r["psnr"] for r in sweep], s=6, c="0.8",
                       label="tuning runs (first captions)", zorder=0)  # fmt: skip
        ax.set(title=f"{model}, {steps} steps", xlabel="MACs / unpatched", ylabel="PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_slope(rows: list[dict], steps: int) -> float:
    """dB per unit of MACs on 0.3.0's default curve (step reuse, t0 8, first-order forecast,
    α 0.2 / 0.3 / 0.5 on the tuning captions): its steepest segment, what extra MACs buy it
    (as `decide.py` prices a win at more MACs)."""
    curve = sorted(
        (r["macs"], r["psnr"])
        for r in rows
        if r["steps"] == steps and r["method"] == "step"
        and r["setting"] in {f"step alpha {a:g} warm-up 8 order 1" for a in (0.2, 0.3, 0.5)}
    )  # fmt: skip
    slopes = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in pairwise(curve) if b[0] > a[0]]
    return max(slopes, default=0.0)


def decide_budget(studies: dict[str, list[dict]], steps_list=(28, 50), budgets=BUDGETS):
    """The defaults rule for a budget: the smallest budget B whose planned run beats 0.3.0's
    default in every (model, steps) group by more than two paired standard errors, after
    what any extra MACs would buy the default on its own curve (`default_slope`).
    -> (B or None, report lines)."""
    lines = [
        "| model | steps | budget | planned MACs | default MACs | planned − default | "
        "price of extra MACs | verdict |",
        "|" + "---|" * 8,
    ]
    winners = []
    for budget in sorted(budgets):
        wins = True
        for model, rows in studies.items():
            images = max((r["images"] for r in rows), default=0)
            for steps in steps_list:
                planned = pick(rows, steps, images, "planned", budget)
                default = pick(rows, steps, images, "default-0.3.0", budget)
                if planned is None or default is None:
                    wins = False
                    lines.append(f"| {model} | {steps} | {budget:g} | | | | | not run |")
                    continue
                mean, se = paired(planned, default)
                extra = max(0.0, planned["macs"] - default["macs"])
                price = extra * default_slope(rows, steps)
                win = mean - price > 2 * se
                wins &= win
                lines.append(
                    f"| {model} | {steps} | {budget:g} | {planned['macs']:.3f} | "
                    f"{default['macs']:.3f} | {mean:+.2f} ± {se:.2f} | {price:.2f} | "
                    f"{'win' if win else 'no win'} |"
                )
        if wins:
            winners.append(budget)
    chosen = min(winners) if winners else None
    return chosen, lines


def settings_table(studies: dict[str, list[dict]], steps_list=(28, 50), budgets=BUDGETS) -> str:
    """README's "which settings" table: per budget, the bound speed-up and the planned run's
    PSNR (worst image) on each model and step count, with the best tuned peer's beside it."""
    head = ["budget `macs=`", "bound"]
    for model in studies:
        head += [f"{model} {steps} steps: planned / best tuned" for steps in steps_list]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for budget in budgets:
        cells = [f"{budget:g}", f"{1 / budget:.2f}x"]
        for rows in studies.values():
            images = max((r["images"] for r in rows), default=0)
            for steps in steps_list:
                planned = pick(rows, steps, images, "planned", budget)
                peers = [pick(rows, steps, images, m, budget) for m in PEERS]
                peers = [p for p in peers if p is not None]
                best = max(peers, key=lambda r: r["psnr"]) if peers else None
                cell = (
                    "–"
                    if planned is None
                    else f"**{planned['psnr']:.1f}** ({planned['psnr_min']:.1f})"
                )
                if best is not None:
                    cell += f" / {best['psnr']:.1f} ({best['psnr_min']:.1f})"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
