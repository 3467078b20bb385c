"""The `catpatch` command line: `catpatch demo|generate|eval|bench|study|census|heterogeneity`.

Bad input to any command ends in one line on stderr that names the fix and exit status 2
(`common.CommandError`, `common.Parser`); `--help` shows every option with its default;
`--version` prints the version. Output into a closed pipe (`catpatch census | head -3`) ends
quietly with status 141, as a program killed by SIGPIPE does.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .. import __version__, policies
from .budget import add_budget_options, budget_config_error
from .common import (
    MODEL_HELP,
    PROGRESS_HELP,
    CommandError,
    HelpFormatter,
    Parser,
    add_cat_options,
    check_output_folder,
    fail,
    nonnegative_int,
    plural,
    positive_int,
    show_progress,
    warn,
)


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        formatter_class=HelpFormatter,
        help="the default budget (or --macs, --selection) on the embedded offline pipeline, with "
        "pictures",
        description="Generate the same prompts unpatched and patched (the default: a MACs "
        "budget of 0.5, --macs; or the policy --selection names) on the toy pipeline shipped "
        "in catpatch (or --model); "
        "write compare.png (side by side, with the difference) and summary.json; with a token "
        "policy (--selection cat, random, ...) also the tokens recomputed per pruned step "
        "(tokens.png, tokens.gif), and with CAT's clusters (cat, paper, cat+reuse) the cluster "
        "map (clusters.png); print the savings and warm timings.",
    )
    p.add_argument("--out", default="out/demo", help="output folder")
    p.add_argument("--model", default="toy", help=MODEL_HELP)
    p.add_argument(
        "--prompt", action="append",
        help="a prompt; repeat for more (default: four captions the toy model renders well)",
    )  # fmt: skip
    add_cat_options(p)
    p.add_argument(
        "--steps", type=positive_int,
        help="denoising steps (default: the model's recommended, 28)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="image i of the prompts uses seed + i")
    p.add_argument(
        "--repeats", type=nonnegative_int, default=3,
        help="warm timed runs of each side, alternating, after one warm-up run each; more are "
        "timed when the speed-up is above the bound (0: no timing)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="default: cpu for toy, else cuda if available")
    p.add_argument("--no-progress", dest="progress", action="store_false", help=PROGRESS_HELP)
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from .budget import budget_fields, check_budget_steps
    from .common import cat_config, check_device, resolve_cat_options, warn_if_nothing_pruned
    from .demo import DEMO_PROMPTS, run_demo
    from .timing import bound_note, runs_label

    resolve_cat_options(args)
    check_device(args.device)
    config = cat_config(**budget_fields(args)) if args.macs is not None else cat_config(
        keep_ratio=args.keep_ratio,
        warmup_steps=args.warmup_steps,
        num_clusters=args.num_clusters,
        selection=args.selection,
    )  # fmt: skip
    steps = args.steps or _recommended_steps(args.model)
    if config.budgeted:
        check_budget_steps(config.macs, steps)
    else:
        warn_if_nothing_pruned("demo", steps, args.warmup_steps)
    extra = {} if args.steps is None else {"num_inference_steps": args.steps}
    summary = run_demo(
        args.out, prompts=args.prompt or DEMO_PROMPTS, config=config, seed=args.seed,
        device=args.device, model=args.model, repeats=args.repeats,
        progress=show_progress(args.progress),
        **extra,
    )  # fmt: skip
    print(summary["summary_text"])
    psnr = ", ".join("identical" if p is None else f"{p:.1f} dB" for p in summary["psnr_db"])
    name = policies.policy_label(config)
    print(f"PSNR of each image with {name} against its unpatched one: {psnr}")
    timing = summary.get("timing")
    if timing:
        images = len(summary["prompts"])
        print(
            f"time per run of {plural(images, 'image')}, {runs_label(timing['warm_runs'])} of "
            f"each after a warm-up run: unpatched {timing['median_unpatched_s']:.2f} s, {name} "
            f"{timing['median_patched_s']:.2f} s ({timing['speedup']:.2f}x; at most "
            f"{timing['bound']:.2f}x by the MACs; the whole pipeline on this machine: `catpatch "
            f"bench` times the denoising loop alone)"
        )
        if not timing["plausible"]:
            warn("demo", bound_note(timing["speedup"], timing["bound"]))
        elif timing["busy"]:
            warn("demo", timing["busy"])
    else:
        print("no timing (--repeats 0): `catpatch bench` times the denoising loop")
    print(f"wrote {', '.join(summary['files'])} and summary.json to {args.out}")
    return 0


def _recommended_steps(model: str) -> int:
    """The steps the demo runs without --steps: a shipped model's own, else 28."""
    from ..trained import builtin_models

    builtin = builtin_models().get(model)
    steps = builtin.call_kwargs.get("num_inference_steps") if builtin is not None else None
    return int(steps or 28)


def _study_parser(sub) -> None:
    p = sub.add_parser(
        "study",
        formatter_class=HelpFormatter,
        help="image quality of every policy at equal MACs on a shipped trained model",
        description="Generate a fixed set of captions/seeds on a trained pipeline shipped in "
        "catpatch (--model toy or scenes) unpatched and with every policy at equal MACs (step "
        "reuse, CAT, its ablations random/noise/stale, CAT's reference rules, CAT + step reuse, "
        "with and without forecasts) and the peers TaylorSeer and MagCache, at 28/50 steps and "
        "keep ratios 0.2/0.3/0.5, plus t0 and cluster sweeps; score them against the unpatched "
        "images and the captions; write study.csv, study.md, study.png and study.json. With "
        "--macs B, also the method 'planned' (CATConfig(macs=B): the planner's steps, "
        "forecast on the others) at every step count, in study.md, study.png and against "
        "step reuse at the same MACs in targets.md. Re-run into the same --out to resume. "
        "What the full study found: examples/STUDY.md.",
    )
    p.add_argument("--out", default="out/study", help="output folder")
    p.add_argument(
        "--model", default="toy",
        help="'toy' or 'scenes' (the pipelines shipped in catpatch) or a folder written by "
        "`python -m catpatch.toy train` / `python -m catpatch.scenes train` (pipeline and "
        "detector)",
    )  # fmt: skip
    p.add_argument("--images", type=positive_int, default=64, help="caption/seed pairs")
    p.add_argument("--quick", action="store_true", help="28 steps, keep ratio 0.3 only")
    p.add_argument(
        "--report", action="store_true",
        help="run nothing: write the tables of the runs an interrupted study in --out finished",
    )  # fmt: skip
    add_budget_options(p, what="the added 'planned' method")
    p.add_argument("--no-progress", dest="progress", action="store_false", help=PROGRESS_HELP)
    p.set_defaults(func=_study)


def _study(args) -> int:
    from .budget import budget_fields, check_budget_options, check_budget_steps
    from .common import cat_config
    from .study import STEPS, check_model, planned_runs, run_study

    check_budget_options(args)
    extra = []
    if args.macs is not None:
        config = cat_config(**budget_fields(args))
        check_budget_steps(config.macs, min(STEPS), more="")  # 28, the fewest the study runs
        extra = planned_runs(config, args.quick)
    check_model(args.model)
    run_study(args.out, images=args.images, quick=args.quick, model=args.model,
              progress=show_progress(args.progress), report=args.report,
              extra=extra)  # fmt: skip
    print(Path(args.out, "study.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="catpatch",
        description="Faster diffusers DiT pipelines (SD3, FLUX.1, PixArt-Σ): late steps "
        "planned from a MACs budget and forecast (the default, --macs) or image tokens pruned "
        "(CAT, --selection cat).",
    )
    parser.add_argument("--version", action="version", version=f"catpatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .bench import add_parser as add_bench
    from .census import add_parser as add_census
    from .evaluate import add_parser as add_eval
    from .generate import add_parser as add_generate
    from .heterogeneity import add_parser as add_heterogeneity

    _demo_parser(sub)
    add_generate(sub)
    add_eval(sub)
    add_bench(sub)
    _study_parser(sub)
    add_census(sub)
    add_heterogeneity(sub)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of `catpatch COMMAND`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    return parser


def _one_line_warnings(command: str, show, budgeted: bool = False):
    """`warnings.showwarning` that prints the library's warnings about a budget planned
    without the model's calibration, or one that saves nothing (`--macs 1`), as one `catpatch
    COMMAND: warning:` line; the run that saves nothing without a budget is said before it
    starts, in the command's own words (`warn_if_nothing_pruned`); any other warning as
    `show` does."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text.startswith("catpatch: ") and "calibration" in text:
            warn(command, text.removeprefix("catpatch: "))
        elif text.startswith("catpatch: ") and "saves nothing" in text:
            if budgeted:
                warn(command, text.removeprefix("catpatch: "))
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


EXIT_BROKEN_PIPE = 128 + 13  # as a program killed by SIGPIPE: the reader stopped reading


def main(argv: Sequence[str] | None = None) -> int:
    """`catpatch ...`; the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's parser says it, so the hint names `catpatch demo --help`
        _subcommand_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "out", None) is not None:
            # every command's output folder, checked once before any work
            check_output_folder(args.out)
        with warnings.catch_warnings():
            budgeted = getattr(args, "macs", None) is not None
            warnings.showwarning = _one_line_warnings(
                args.command, warnings.showwarning, budgeted
            )
            status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except CommandError as err:
        return fail(args.command, err)
    except ValueError as err:
        # a budget that fails only when the run starts (the planner: too few steps fit)
        error = budget_config_error(err)
        if error is None:
            raise
        return fail(args.command, error)
    except BrokenPipeError:
        # `catpatch census | head -3`: the reader is gone; say nothing, and point stdout at
        # /dev/null so that the interpreter's own flush at exit does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
