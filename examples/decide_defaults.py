"""The defaults rule over the studies of both shipped models (issue #18, README "Which policy").

    python examples/decide_defaults.py toy=out/study-toy-full scenes=out/study-scenes-full \
        --start cat --out examples/results/defaults-2026-12-05.md

Each argument is MODEL=FOLDER, a folder `catpatch study --model MODEL --out FOLDER` wrote
(finished or interrupted: its `rows.jsonl`). Prints and writes the report of
`catpatch.cli.study.decide`: every candidate against the default in each (steps, α) group of
each model, then against the winner, until nothing beats the one standing.
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
