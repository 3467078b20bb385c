"""The frontier study (`catpatch.cli.study.frontier_runs`): catpatch's planned run at each MACs
budget against the best tuned setting of step reuse (0.3.0), TaylorSeer and CAT.

    python examples/frontier_study.py --model toy --out examples/results/frontier-toy
    python examples/frontier_study.py --model scenes --images 32 --tune 8 --small 2 \\
        --out examples/results/frontier-scenes

Resumable: run the same command again after an interruption. `--stages` runs a part
(sweep: the tuning runs; final: the best tuned setting per budget on every caption;
planned: `CATConfig(macs=B)`); `--report` writes the tables and plot of what has run.
"""

from __future__ import annotations

import argparse

from catpatch.cli.study.frontier_report import write_report
from catpatch.cli.study.frontier_runs import BUDGETS, PLANNED, run_frontier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tune", type=int, default=16)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument(
        "--small", type=int, default=0, choices=(0, 1, 2), help="coarser sweeps (slow models)"
    )
    parser.add_argument("--stages", nargs="+", default=["sweep", "planned", "final"])
    parser.add_argument("--methods", nargs="+", default=list(PLANNED), help="budgeted runs")
    parser.add_argument("--report", action="store_true", help="only write the report")
    args = parser.parse_args()
    if not args.report:
        run_frontier(
            args.out, args.model, tuple(args.steps), args.images, args.tune,
            tuple(args.budgets), args.small, tuple(args.stages), tuple(args.methods),
        )  # fmt: skip
    write_report(args.out, args.model, tuple(args.steps), args.images, tuple(args.budgets))


if __name__ == "__main__":
    main()
