"""The defaults rule over the studies of several models (`decide`).

A method replaces the default where, in every (steps, α) group of every model, it beats the
default by more than two paired standard errors of the PSNR difference over the same images,
or is within them at fewer MACs. A win at more MACs (step reuse rounds to whole steps) must
also exceed what those extra MACs buy on the default's own curve (its steepest segment). Only
methods run at every keep ratio (the token policies and step reuse) are candidates: the others
have no run at the default's MACs to pair with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .methods import KEEP_RATIOS, STEP_METHODS, STEPS, TOKEN_METHODS, in_sweep
from .rows import Row, load_done
from .tables import _paired

CANDIDATES = (*TOKEN_METHODS, *STEP_METHODS)
WIN, CHEAPER_TIE, TIE, LOSS, MISSING = "win", "tie, fewer MACs", "tie", "loss", "not run"
COSTLIER = "ahead by less than its extra MACs buy the default"
ACCEPTED = (WIN, CHEAPER_TIE)


@dataclass(frozen=True)
class Outcome:
    """One candidate against the default in one (model, steps, α) group."""

    model: str
    steps: int
    keep_ratio: float
    difference: float  # candidate − default, dB PSNR, mean over the same images
    error: float  # its standard error
    macs: float  # the candidate's MACs ratio
    default_macs: float
    verdict: str


def load_study(folder: str | Path) -> list[Row]:
    """The finished rows of the study in `folder` (its `rows.jsonl`), at its largest image
    count (a folder may hold a quick run with fewer images beside the full one)."""
    import json

    path = Path(folder) / "rows.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no study here; run `catpatch study --out {folder}`")
    counts = {json.loads(line)["images"] for line in path.read_text().splitlines()}
    return list(load_done(path, max(counts)).values())


def outcomes(model: str, rows: list[Row], default: str = "cat") -> dict[str, list[Outcome]]:
    """Every candidate against `default` in each (steps, α) group of `model`'s study."""
    main = [r for r in rows if not in_sweep(r)]

    def find(steps: int, method: str, keep: float) -> Row | None:
        return next(
            (r for r in main if (r.steps, r.method, r.keep_ratio) == (steps, method, keep)), None
        )

    found: dict[str, list[Outcome]] = {m: [] for m in CANDIDATES if m != default}
    for steps in STEPS:
        for keep in KEEP_RATIOS:
            base = find(steps, default, keep)
            for method in found:
                other = find(steps, method, keep)
                if base is None or other is None:
                    nan = float("nan")
                    found[method].append(Outcome(model, steps, keep, nan, nan, nan, nan, MISSING))
                    continue
                diff, se = _paired(other, base)
                cheaper = other.macs_ratio < base.macs_ratio - 1e-9
                # Step reuse rounds to whole steps, so its MACs can exceed the default's: a win
                # must then also cover what the default's own curve gains over those MACs.
                extra = max(0.0, other.macs_ratio - base.macs_ratio)
                curve = [r for r in main if (r.steps, r.method) == (steps, default)]
                bought = extra * _slope(curve)
                if diff - bought - 2 * se > 0:
                    verdict = WIN
                elif diff - 2 * se > 0:
                    verdict = COSTLIER
                elif abs(diff) <= 2 * se:
                    verdict = CHEAPER_TIE if cheaper else TIE
                else:
                    verdict = LOSS
                macs = (other.macs_ratio, base.macs_ratio)
                found[method].append(Outcome(model, steps, keep, diff, se, *macs, verdict))
    return found


def _slope(curve: list[Row]) -> float:
    """dB of PSNR per unit of MACs ratio the steepest segment of a method's curve gains (0
    with fewer than two points): an upper bound on what a little more MACs buys it."""
    points = sorted((r.macs_ratio, r.psnr) for r in curve)
    pairs = zip(points, points[1:], strict=False)
    slopes = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in pairs if x1 > x0]
    return max([0.0, *slopes])


def qualifying(studies: dict[str, list[Row]], default: str = "cat") -> list[str]:
    """The candidates the rule accepts against `default` on every model, best worst-group
    margin first."""
    merged: dict[str, list[Outcome]] = {}
    for model, rows in studies.items():
        for method, found in outcomes(model, rows, default).items():
            merged.setdefault(method, []).extend(found)
    accepted = [m for m, found in merged.items() if all(o.verdict in ACCEPTED for o in found)]
    return sorted(accepted, key=lambda m: -min(o.difference for o in merged[m]))


def decide(studies: dict[str, list[Row]], default: str = "cat") -> tuple[str, str]:
    """The default the rule picks from the studies of each model (`{model: rows}`) and a
    markdown report: every candidate against the default per group, then against the
    challenger, until no candidate beats the one standing."""
    lines = [
        f"Rule: a method replaces the default `{default}` where, in every (steps, α) group of "
        f"every model, it beats it by more than two paired standard errors (dB PSNR over the "
        f"same images), or is within them at fewer MACs.\n"
    ]
    standing, seen = default, {default}
    while True:
        lines.append(_report(studies, standing))
        better = [m for m in qualifying(studies, standing) if m not in seen]
        if not better:
            lines.append(f"\nNo method beats `{standing}` by the rule: **`{standing}`** stays.\n")
            return standing, "\n".join(lines)
        lines.append(
            f"\nAccepted against `{standing}`: {', '.join(f'`{m}`' for m in better)}; "
            f"`{better[0]}` (best worst-group margin) is the challenger.\n"
        )
        standing = better[0]
        seen.add(standing)


def psnr_table(studies: dict[str, list[Row]], methods: tuple[str, ...]) -> str:
    """Markdown: per model and (steps, α) group, the MACs and each method's mean PSNR (worst
    image in brackets); '-' where the study has no such run."""
    head = "| model | steps | α | MACs | " + " | ".join(f"`{m}`" for m in methods) + " |"
    lines = [head, "|---|---|---|---|" + "---|" * len(methods)]
    for model, rows in studies.items():
        main = [r for r in rows if not in_sweep(r)]
        for steps in STEPS:
            for keep in KEEP_RATIOS:
                found = {
                    r.method: r
                    for r in main
                    if (r.steps, r.keep_ratio) == (steps, keep) and r.method in methods
                }
                if not found:
                    continue
                macs = found.get(methods[0], next(iter(found.values()))).macs_ratio
                cells = [
                    f"{found[m].psnr:.2f} ({found[m].psnr_min:.1f})" if m in found else "-"
                    for m in methods
                ]
                lines.append(
                    f"| {model} | {steps} | {keep:g} | {macs:.3f} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines) + "\n"


def _report(studies: dict[str, list[Row]], default: str) -> str:
    out = [f"\n### Against `{default}` (candidate − `{default}`, dB ± SE; verdict)\n"]
    for model, rows in studies.items():
        found = outcomes(model, rows, default)
        methods = list(found)
        out.append(f"\n{model}:\n")
        out.append("| steps | α | " + " | ".join(methods) + " |")
        out.append("|---|---|" + "---|" * len(methods))
        groups = [(o.steps, o.keep_ratio) for o in found[methods[0]]]
        for i, (steps, keep) in enumerate(groups):
            cells = []
            for m in methods:
                o = found[m][i]
                cells.append(
                    "-" if o.verdict == MISSING
                    else f"{o.difference:+.2f} ± {o.error:.2f} {_mark(o.verdict)}"
                )  # fmt: skip
            out.append(f"| {steps} | {keep:g} | " + " | ".join(cells) + " |")
    out.append(
        "\nMarks: ▲ win, △ ahead but by less than its extra MACs buy the default, ≈↓ tie at "
        "fewer MACs, ≈ tie, ▼ loss. "
        "Accepted on every group of every model: "
        + (", ".join(f"`{m}`" for m in qualifying(studies, default)) or "none")
        + "."
    )
    return "\n".join(out)


def _mark(verdict: str) -> str:
    return {WIN: "▲", COSTLIER: "△", CHEAPER_TIE: "≈↓", TIE: "≈", LOSS: "▼"}[verdict]
