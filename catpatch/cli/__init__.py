"""The `catpatch` command line: `catpatch demo|generate|eval|bench|study`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def _bench_parser(sub) -> None:
    from ..config import COMPILE_MODES, SELECTION_MODES
    from ..dtypes import DTYPE_NAMES
    from ..models.shapes import SHAPES
    from .generate import parse_size

    p = sub.add_parser(
        "bench",
        help="time the denoising loop unpatched vs CAT, side by side",
        description="Time whole denoising loops of an SD3-family transformer unpatched and "
        "CAT-patched, alternating in one process after warm-up; print medians, the speed-up, "
        "the arithmetic bound of the config, MACs, cache memory and selection overhead.",
    )
    p.add_argument("--shape", default="cpu-256x8", choices=sorted(SHAPES))
    p.add_argument("--model", help="a pipeline/transformer folder or hub id instead of --shape")
    p.add_argument("--size", type=parse_size, default=(512, 512), help="HxW in pixels (512x512)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-cfg", dest="cfg", action="store_false", help="no CFG (batch B)")
    p.add_argument("--text-tokens", type=int, default=333)
    p.add_argument("--keep-ratio", type=float, default=0.3)
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--num-clusters", type=int, default=20)
    # "step" reuses whole steps and has no pruned step to time
    selections = [m for m in SELECTION_MODES if m != "step"]
    p.add_argument("--selection", default="cat", choices=selections)
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", default="none", choices=["none", *filter(None, COMPILE_MODES)])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    import torch

    from ..dtypes import default_dtype_name
    from .bench import BenchSettings, run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or default_dtype_name(device)
    settings = BenchSettings(
        shape=args.shape,
        model=args.model,
        height=args.size[0],
        width=args.size[1],
        steps=args.steps,
        batch=args.batch,
        cfg=args.cfg,
        text_tokens=args.text_tokens,
        keep_ratio=args.keep_ratio,
        warmup_steps=args.warmup_steps,
        num_clusters=args.num_clusters,
        selection=args.selection,
        dtype=dtype,
        device=device,
        compile=args.compile,
        repeats=args.repeats,
    )
    result = run(settings)
    print(result.to_json() if args.json else result.table())
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="CAT on the embedded offline pipeline, with pictures",
        description="Generate the same prompts with and without CAT on the embedded offline "
        "pipeline; write a side-by-side PNG, the recomputed tokens per pruned step (PNG grid "
        "and GIF), the cluster map and summary.json; print the savings.",
    )
    p.add_argument("--out", default="out/demo", help="output folder (out/demo)")
    p.add_argument("--keep-ratio", type=float, default=0.3)
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--num-clusters", type=int, default=20)
    p.add_argument("--steps", type=int, help="denoising steps (the pipeline's recommended)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from ..config import CATConfig
    from .demo import run_demo

    config = CATConfig(
        keep_ratio=args.keep_ratio, warmup_steps=args.warmup_steps, num_clusters=args.num_clusters
    )
    extra = {} if args.steps is None else {"num_inference_steps": args.steps}
    summary = run_demo(args.out, config=config, seed=args.seed, device=args.device, **extra)
    print(f"pipeline: {summary['pipeline']}")
    print(summary["summary_text"])
    print(
        f"time this run: unpatched {summary['time_unpatched_s']:.2f} s, CAT "
        f"{summary['time_cat_s']:.2f} s ({summary['speedup_this_run']:.2f}x; a single run, "
        f"not a benchmark: see `catpatch bench`)"
    )
    print(f"wrote {', '.join(summary['files'])} and summary.json to {args.out}")
    return 0


def _study_parser(sub) -> None:
    p = sub.add_parser(
        "study",
        help="quality under pruning on the trained toy model: CAT vs naive selection",
        description="Generate a fixed set of captions/seeds on the trained toy pipeline "
        "unpatched and with CAT and the equal-MACs ablations (random, noise, stale, step reuse) "
        "at 28/50 steps and keep ratios 0.2/0.3/0.5, plus t0 and cluster sweeps; write "
        "study.csv, study.md, study.png and study.json.",
    )
    p.add_argument("--out", default="out/study")
    p.add_argument("--images", type=int, default=64, help="caption/seed pairs (64)")
    p.add_argument("--quick", action="store_true", help="28 steps, keep ratio 0.3 only")
    p.set_defaults(func=_study)


def _study(args) -> int:
    from .study import run_study

    run_study(args.out, images=args.images, quick=args.quick)
    print(Path(args.out, "study.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catpatch", description="CAT pruning for Stable Diffusion 3 pipelines"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from .census import add_parser as add_census
    from .evaluate import add_parser as add_eval
    from .generate import add_parser as add_generate

    _demo_parser(sub)
    add_generate(sub)
    add_eval(sub)
    _bench_parser(sub)
    _study_parser(sub)
    add_census(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
