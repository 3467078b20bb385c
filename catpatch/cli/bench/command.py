"""The command line of `catpatch bench`: its options (`add_parser`) and running it from parsed
arguments (`command`)."""

from __future__ import annotations

import argparse

from ..common import (
    MODEL_HELP,
    HelpFormatter,
    add_cat_options,
    positive_int,
    resolve_cat_options,
    warn,
)
from .measure import run
from .settings import BenchSettings, check_settings, config_or_error, default_size


def _builtin_text_tokens(model: str | None) -> int | None:
    """T of a shipped model's calls (32 for toy, 48 for scenes), None for anything else."""
    from ...trained import builtin_models

    builtin = builtin_models().get(model) if model else None
    return builtin.text_tokens if builtin is not None else None


def add_parser(sub) -> None:
    """Register `bench` on the `catpatch` subcommands."""
    from ...config import COMPILE_MODES
    from ...dtypes import DTYPE_NAMES
    from ...models.shapes import SHAPES
    from ..generate import parse_size

    p = sub.add_parser(
        "bench",
        formatter_class=HelpFormatter,
        help="time the denoising loop unpatched vs patched (the --selection policy)",
        description="Time whole denoising loops of an SD3-family, FLUX.1 or PixArt-Σ transformer "
        "unpatched and patched (the default budget, --macs, or the policy --selection names), "
        "alternating in one process after warm-up; print medians, "
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
    p.set_defaults(func=command)


def command(args) -> int:
    """Run `catpatch bench` from parsed arguments; the exit code."""
    import torch

    from ...config import CATConfig
    from ...dtypes import default_dtype_name

    resolve_cat_options(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or default_dtype_name(device)
    config = config_or_error(args.shape, args.model)  # a hub id: looked up once, here
    height, width = args.size or default_size(args.shape, args.model, config)
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
        macs=args.macs,
        forecast=args.forecast or CATConfig.forecast,
        calibration=args.calibration,
        lean=args.lean,
        dtype=dtype,
        device=device,
        compile=args.compile,
        repeats=args.repeats,
    )
    check_settings(settings, device_given=args.device is not None, config=config)
    result = run(settings)
    print(result.to_json() if args.json else result.table())
    if not result.plausible:
        warn("bench", result.note())
    elif result.busy:
        warn("bench", result.busy)
    return 0
