"""The `catpatch` command line: `catpatch demo|generate|eval|bench|study|census|heterogeneity`.

Bad input to any command ends in one line on stderr that names the fix and exit status 2
(`common.CommandError`, `common.Parser`); `--help` shows every option with its default.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..toy import TEXT_TOKENS as TOY_TEXT_TOKENS
from .common import (
    MODEL_HELP,
    CommandError,
    HelpFormatter,
    Parser,
    add_cat_options,
    fail,
    nonnegative_int,
    positive_int,
)


def _bench_parser(sub) -> None:
    from .. import policies
    from ..config import COMPILE_MODES
    from ..dtypes import DTYPE_NAMES
    from ..models.shapes import SHAPES
    from .generate import parse_size

    p = sub.add_parser(
        "bench",
        formatter_class=HelpFormatter,
        help="time the denoising loop unpatched vs CAT, side by side",
        description="Time whole denoising loops of an SD3-family, FLUX.1 or PixArt-Σ "
        "transformer unpatched and "
        "CAT-patched, alternating in one process after warm-up; print medians, the speed-up, "
        "the arithmetic bound of the config, MACs, cache memory and selection overhead.",
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
        "512x512 with --shape; the model's sample size x 8 with --model, 256x256 for toy)",
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
        help="text tokens T per row (default: what the family's pipelines pass: 333, SD3's 77 "
        "CLIP + 256 T5; FLUX's 512 T5; PixArt-Σ's 300 T5; "
        "32 with --model toy)",
    )  # fmt: skip
    add_cat_options(p)
    # Policies that skip whole steps ("step", "cat+reuse") are left out: the bound of the
    # table is for pruned steps.
    selections = [name for name, (_, step) in policies.REGISTRY.items() if not step.skips]
    p.add_argument(
        "--selection", default="cat", choices=selections,
        help="token selection: CAT or a same-budget ablation",
    )  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--compile", default="none", choices=["none", *filter(None, COMPILE_MODES)],
        help="torch.compile mode, the same on both sides",
    )  # fmt: skip
    p.add_argument(
        "--repeats", type=positive_int, default=3,
        help="timed loops of each side after two warm-up loops; medians are reported",
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
        text_tokens=args.text_tokens or (TOY_TEXT_TOKENS if args.model == "toy" else None),
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
        help="warm timed runs of each side, alternating, after one warm-up run each (0: no "
        "timing)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="default: cpu for toy, else cuda if available")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from .common import cat_config, check_device, warn_if_nothing_pruned
    from .demo import DEMO_PROMPTS, run_demo

    check_device(args.device)
    config = cat_config(
        keep_ratio=args.keep_ratio, warmup_steps=args.warmup_steps, num_clusters=args.num_clusters
    )
    warn_if_nothing_pruned("demo", args.steps or 28, args.warmup_steps)
    extra = {} if args.steps is None else {"num_inference_steps": args.steps}
    summary = run_demo(
        args.out, prompts=args.prompt or DEMO_PROMPTS, config=config, seed=args.seed,
        device=args.device, model=args.model, repeats=args.repeats, progress=args.progress,
        **extra,
    )  # fmt: skip
    print(summary["summary_text"])
    timing = summary.get("timing")
    if timing:
        runs = timing["warm_runs"]
        print(
            f"time per run of {len(summary['prompts'])} images, median of {runs} warm "
            f"run{'s' if runs > 1 else ''} each: unpatched {timing['median_unpatched_s']:.2f} s, "
            f"CAT {timing['median_cat_s']:.2f} s ({timing['speedup']:.2f}x; the whole pipeline on "
            f"this machine: `catpatch bench` times the denoising loop alone)"
        )
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
        help="'toy' (the pipeline shipped in catpatch) or a folder written by `python -m "
        "catpatch.toy train` (pipeline and detector)",
    )  # fmt: skip
    p.add_argument("--images", type=positive_int, default=64, help="caption/seed pairs")
    p.add_argument("--quick", action="store_true", help="28 steps, keep ratio 0.3 only")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_study)


def _study(args) -> int:
    from .study import check_model, run_study

    check_model(args.model)
    run_study(args.out, images=args.images, quick=args.quick, model=args.model,
              progress=args.progress)  # fmt: skip
    print(Path(args.out, "study.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="catpatch", description="CAT pruning for Stable Diffusion 3 pipelines")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandError as err:
        return fail(args.command, err)
