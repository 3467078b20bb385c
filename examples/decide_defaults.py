"""The defaults rule over the studies of both shipped models (issue #18, README "Which policy").

    python examples/decide_defaults.py toy=out/study-toy-full scenes=out/study-scenes-full \
        --start cat --out examples/results/defaults-2026-12-05.md

Each argument is MODEL=FOLDER, a folder `catpatch study --model MODEL --out FOLDER` wrote
(finished or interrupted: its `rows.jsonl`). Prints and writes the report of
`catpatch.cli.study.decide`: every candidate against the default in each (steps, α) group of
each model, then against the winner, until nothing beats the one standing.

    python examples/decide_defaults.py --budget toy=examples/results/frontier-toy \
        scenes=examples/results/frontier-scenes --out examples/results/defaults-budget.md

`--budget`: the folders are frontier studies (`examples/frontier_study.py`); the rule for a
budget default: the smallest budget whose planned run beats 0.3.0's default in every (model,
steps) group by more than two paired standard errors at no more MACs
(`catpatch.cli.study.frontier_report.decide_budget`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from catpatch import CATConfig, __version__
from catpatch.cli.study.decide import decide, load_study, psnr_table
from catpatch.cli.study.methods import STEP_METHODS, TOKEN_METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", metavar="MODEL=FOLDER")
    parser.add_argument("--out", type=Path, help="also write the report here (markdown)")
    parser.add_argument(
        "--start", default=CATConfig().selection, help="the default to start from (today's)"
    )
    parser.add_argument("--budget", action="store_true", help="frontier studies: a budget")
    args = parser.parse_args()
    if args.budget:
        return decide_budget_default(args)
    studies = {}
    for spec in args.studies:
        model, sep, folder = spec.partition("=")
        if not sep:
            parser.error(f"{spec}: expected MODEL=FOLDER, e.g. scenes=out/study-scenes-full")
        studies[model] = load_study(folder)
    images = {m: max((len(r.psnr_each) for r in rows), default=0) for m, rows in studies.items()}
    default = args.start
    chosen, report = decide(studies, default)
    fields = {**TOKEN_METHODS, **STEP_METHODS}[chosen]
    head = (
        f"# Defaults from the studies (catpatch {__version__})\n\n"
        + "".join(f"- {m}: {len(studies[m])} runs, {images[m]} images each\n" for m in studies)
        + f"\nStarting from `{default}`, the rule picks **`{chosen}`**: `CATConfig("
        + ", ".join(f"{k}={v!r}" for k, v in fields.items())
        + ")`.\n\n"
        + "PSNR dB against the unpatched images (worst image in brackets) at equal MACs:\n\n"
        + psnr_table(studies, ("cat", "paper", "random", "stale", "step", "step+forecast"))
        + "\n"
    )
    print(head + report)
    if args.out:
        args.out.write_text(head + report)


def decide_budget_default(args) -> None:
    from catpatch.cli.study.frontier_report import decide_budget, load_rows, settings_table

    studies = {}
    for spec in args.studies:
        model, _, folder = spec.partition("=")
        studies[model] = load_rows(Path(folder))
    chosen, lines = decide_budget(studies)
    verdict = (
        f"the rule picks **`CATConfig(macs={chosen:g})`** (bound {1 / chosen:.2f}x)"
        if chosen is not None
        else "no budget wins every group: the default stays"
    )
    text = (
        f"# A budget as the default (catpatch {__version__})\n\n"
        "Each budget's planned run against 0.3.0's default (step reuse, α 0.3, t0 8, "
        "first-order forecast) on the same images, paired; a win is more than two standard "
        "errors ahead after what any extra MACs buy the default on its own curve. Result: "
        f"{verdict}.\n\n" + "\n".join(lines) + "\n\n## Budget -> PSNR (worst image), "
        "planned against the best tuned step reuse / TaylorSeer\n\n"
        + settings_table(studies) + "\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
