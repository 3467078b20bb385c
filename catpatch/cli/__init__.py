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
from collections.abc import Sequence
from pathlib import Path

from .. import __version__, policies
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


def _builtin_text_tokens(model: str | None) -> int | None:
    """T of a shipped model's calls (32 for toy, 48 for scenes), None for anything else."""
    from ..toy.model import builtin_models

    builtin = builtin_models().get(model) if model else None
    return builtin.text_tokens if builtin is not None else None


def _bench_parser(sub) -> None:
    from ..config import COMPILE_MODES
    from ..dtypes import DTYPE_NAMES
    from ..models.shapes import SHAPES
    from .generate import parse_size

    p = sub.add_parser(
        "bench",
        formatter_class=HelpFormatter,
        help="time the denoising loop unpatched vs CAT, side by side",
        description="Time whole denoising loops of an SD3-family, FLUX.1 or PixArt-Σ transformer "
        "unpatched and CAT-patched, alternating in one process after warm-up; print medians, "
        "the speed-up checked against the arithmetic bound of the run (timed again, then "
        "flagged, when above it), MACs, cache memory and selection overhead.",
    )
    p.add_argument(
        "--shape", default="cpu-256x8", choices=sorted(SHAPES),
        help="a named SD3-family, FLUX or PixArt-Σ transformer shape with random weights (speed "
        "does not depend on the weights)",
    )  # fmt: skip
    p.add_argument(
        "--model",
        help=f"time this model's transformer instead of --shape: {MODEL_HELP} (default: none)",
    )
    p.add_argument(
        "--size", type=parse_size,
        help="HxW in pixels of an SD3 VAE (latents are 1/8 of it), multiples of 16 (default: "
        "512x512 with --shape; the model's sample size x 8 with --model: 256x256 for toy, whose "
        "own VAE makes the same 256 tokens from 64x64 px)",
    )  # fmt: skip
    p.add_argument("--steps", type=positive_int, default=28, help="denoising steps per loop")
    p.add_argument("--batch", type=positive_int, default=1, help="prompts per loop")
    p.add_argument(
        "--no-cfg", dest="cfg", action="store_false",
        help="no classifier-free guidance: batch rows instead of 2 x batch (FLUX: one call per "
        "step instead of true CFG's two)",
    )  # fmt: skip
    p.add_argument(
        "--text-tokens", type=positive_int, default=None,
        help="text tokens T per row (default: what the family's pipelines pass: SD3 333, FLUX "
        "512, PixArt-Σ 300; 32 with --model toy, 48 with scenes)",
    )  # fmt: skip
    add_cat_options(p)  # with --selection ('step' and 'cat+reuse': the bound counts a
    # skipped step as free)
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--compile", default="none", choices=["none", *filter(None, COMPILE_MODES)],
        help="torch.compile mode, the same on both sides",
    )  # fmt: skip
    p.add_argument(
        "--repeats", type=positive_int, default=3,
        help="timed loops of each side after two warm-up loops; their medians are reported (more "
        "are timed when the speed-up is above the bound)",
    )  # fmt: skip
    p.add_argument(
        "--lean", action=argparse.BooleanOptionalAction, default=True,
        help="CATConfig.lean: no dense residual stream, a third less cache memory "
        "(--no-lean: the specification's dense estimate)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    import torch

    from ..dtypes import default_dtype_name
    from .bench import BenchSettings, check_settings, default_size, run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or default_dtype_name(device)
    height, width = args.size or default_size(args.shape, args.model)
    settings = BenchSettings(
        shape=args.shape,
        model=args.model,
        height=height,
        width=width,
        steps=args.steps,
        batch=args.batch,
        cfg=args.cfg,
        text_tokens=args.text_tokens or _builtin_text_tokens(args.model),
        keep_ratio=args.keep_ratio,
        warmup_steps=args.warmup_steps,
        num_clusters=args.num_clusters,
        selection=args.selection,
        lean=args.lean,
        dtype=dtype,
        device=device,
        compile=args.compile,
        repeats=args.repeats,
    )
    check_settings(settings, device_given=args.device is not None)
    result = run(settings)
    print(result.to_json() if args.json else result.table())
    if not result.plausible:
        warn("bench", result.note())
    elif result.busy:
        warn("bench", result.busy)
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        formatter_class=HelpFormatter,
        help="CAT on the embedded offline pipeline, with pictures",
        description="Generate the same prompts with and without CAT on the toy pipeline shipped "
        "in catpatch (or --model); write a side-by-side PNG, the recomputed tokens per pruned "
        "step (PNG grid and GIF), the cluster map and summary.json; print the savings and warm "
        "timings.",
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
    from .common import cat_config, check_device, warn_if_nothing_pruned
    from .demo import DEMO_PROMPTS, run_demo
    from .timing import bound_note, runs_label

    check_device(args.device)
    check_output_folder(args.out)
    config = cat_config(
        keep_ratio=args.keep_ratio,
        warmup_steps=args.warmup_steps,
        num_clusters=args.num_clusters,
        selection=args.selection,
    )
    warn_if_nothing_pruned("demo", args.steps or 28, args.warmup_steps)
    extra = {} if args.steps is None else {"num_inference_steps": args.steps}
    summary = run_demo(
        args.out, prompts=args.prompt or DEMO_PROMPTS, config=config, seed=args.seed,
        device=args.device, model=args.model, repeats=args.repeats,
        progress=show_progress(args.progress),
        **extra,
    )  # fmt: skip
    print(summary["summary_text"])
    psnr = ", ".join("identical" if p is None else f"{p:.1f} dB" for p in summary["psnr_db"])
    name = policies.label(config.selection)
    print(f"PSNR of each image with {name} against its unpatched one: {psnr}")
    timing = summary.get("timing")
    if timing:
        images = len(summary["prompts"])
        print(
            f"time per run of {plural(images, 'image')}, {runs_label(timing['warm_runs'])} of "
            f"each after a warm-up run: unpatched {timing['median_unpatched_s']:.2f} s, {name} "
            f"{timing['median_cat_s']:.2f} s ({timing['speedup']:.2f}x; at most "
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


def _study_parser(sub) -> None:
    p = sub.add_parser(
        "study",
        formatter_class=HelpFormatter,
        help="quality under pruning on the trained toy model: CAT vs naive selection",
        description="Generate a fixed set of captions/seeds on the trained toy pipeline "
        "unpatched and with CAT and the equal-MACs ablations (random, noise, stale, step reuse) "
        "at 28/50 steps and keep ratios 0.2/0.3/0.5, plus t0 and cluster sweeps; write "
        "study.csv, study.md, study.png and study.json. Re-run into the same --out to resume.",
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
    p.add_argument("--no-progress", dest="progress", action="store_false", help=PROGRESS_HELP)
    p.set_defaults(func=_study)


def _study(args) -> int:
    from .study import check_model, run_study

    check_model(args.model)
    check_output_folder(args.out)
    run_study(args.out, images=args.images, quick=args.quick, model=args.model,
              progress=show_progress(args.progress), report=args.report)  # fmt: skip
    print(Path(args.out, "study.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="catpatch", description="CAT pruning for Stable Diffusion 3 pipelines")
    parser.add_argument("--version", action="version", version=f"catpatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .census import add_parser as add_census
    from .evaluate import add_parser as add_eval
    from .generate import add_parser as add_generate
    from .heterogeneity import add_parser as add_heterogeneity

    _demo_parser(sub)
    add_generate(sub)
    add_eval(sub)
    _bench_parser(sub)
    _study_parser(sub)
    add_census(sub)
    add_heterogeneity(sub)
    return parser


EXIT_BROKEN_PIPE = 128 + 13  # as a program killed by SIGPIPE: the reader stopped reading


def main(argv: Sequence[str] | None = None) -> int:
    """`catpatch ...`; the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except CommandError as err:
        return fail(args.command, err)
    except BrokenPipeError:
        # `catpatch census | head -3`: the reader is gone; say nothing, and point stdout at
        # /dev/null so that the interpreter's own flush at exit does not complain either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
