"""`catpatch census`: kernels, bytes moved and FLOPs of a full and a pruned step, no GPU needed.

    catpatch census --shape sd3-medium --size 1024x1024            # CFG pair, bf16
    catpatch census --shape sd3.5-large --size 1024x1024 --lean
    catpatch census --shape flux-dev --size 1024x1024              # no CFG pair, T=512
    catpatch census --shape pixart-sigma --size 1024x1024

Builds the named transformer shape on the `meta` device at its real size and counts what one
full, one recording and one pruned step dispatch (see `catpatch.census`): the tool to check a
change to the pruned step before any GPU.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..config import CATConfig
    from ..dtypes import DTYPE_NAMES
    from ..models.shapes import SHAPES
    from .common import HelpFormatter, positive_int
    from .generate import parse_size

    default = CATConfig()
    p = subparsers.add_parser(
        "census",
        help="count kernels, bytes and FLOPs of a full and a pruned step (meta device)",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--shape", default="sd3-medium", choices=sorted(SHAPES), help="model shape")
    p.add_argument("--size", default="1024x1024", type=parse_size, help="HEIGHTxWIDTH in pixels")
    p.add_argument("--batch", type=positive_int, default=1, help="images per call")
    p.add_argument(
        "--no-cfg", action="store_true",
        help="no classifier-free guidance pair (FLUX shapes: always, one row per image)",
    )  # fmt: skip
    p.add_argument(
        "--text-tokens", type=positive_int, default=None,
        help="text tokens T (default: what the family's pipelines pass: SD3 333, FLUX 512, "
        "PixArt-Σ 300)",
    )  # fmt: skip
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES), help="weights dtype")
    p.add_argument("--keep-ratio", type=float, default=default.keep_ratio, help="α")
    p.add_argument(
        "--num-clusters", type=int, default=default.num_clusters, help="CAT spatial clusters"
    )
    p.add_argument(
        "--lean", action=argparse.BooleanOptionalAction, default=True,
        help="CATConfig.lean (--no-lean: the dense residual stream)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=command)
    return p


def command(args: argparse.Namespace) -> int:
    """Run `catpatch census` from parsed arguments; the exit code. Bad settings are rejected
    by the same checks as `catpatch bench` (`common.cat_config`, `common.check_image_size`)."""
    from ..census import census
    from ..dtypes import torch_dtype
    from ..models.shapes import transformer_config
    from .common import cat_config, check_image_size

    height, width = args.size
    config = cat_config(  # the pruned step of CAT's token selection, whatever the default
        selection="cat", keep_ratio=args.keep_ratio, num_clusters=args.num_clusters, lean=args.lean
    )
    check_image_size(transformer_config(args.shape), height, width, config.num_clusters)
    result = census(
        args.shape,
        height,
        width,
        config,
        batch=args.batch,
        cfg=not args.no_cfg,
        text_tokens=args.text_tokens,
        dtype=torch_dtype(args.dtype),
    )
    if args.json:
        phases = ("full", "record", "pruned", "selection")
        counts = {
            name: {
                "kernels": getattr(result, name).kernels,
                "bytes": getattr(result, name).bytes,
                "other_bytes": getattr(result, name).other_bytes,
                "flops": getattr(result, name).flops,
            }
            for name in phases
        }
        print(json.dumps({"shape": args.shape, "cache_bytes": result.cache_bytes, **counts}))
    else:
        print(f"{args.shape} {height}x{width}, {result.rows} rows, {args.dtype}, {result.config!r}")
        print(result.table())
    return 0
