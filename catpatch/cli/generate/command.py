"""`catpatch generate`: images of a prompt list with or without CAT; resumable, data-parallel.
Its command line: the options (`add_arguments`), the `generate` subcommand of `catpatch`
(`add_parser`), running it from parsed arguments with its exit code and report (`command`),
`main` for `python -m catpatch.cli.generate`, and `parse_size`, the HxW parser `catpatch
bench` shares.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ...config import CATConfig
from ...dtypes import DTYPE_NAMES
from ...toy import GUIDANCE_SCALE as TOY_GUIDANCE
from ...trained import builtin_models
from ..common import (
    MODEL_HELP,
    PROGRESS_HELP,
    CommandError,
    HelpFormatter,
    Parser,
    add_cat_options,
    fail,
    plural,
    positive_int,
    resolve_cat_options,
    show_progress,
    warn_if_nothing_pruned,
)
from .manifest import MANIFEST
from .parallel import _close_process_group, check, run
from .prompts import SEED_STRIDE, read_prompts
from .settings import DEFAULT_GUIDANCE, GenerateSettings


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) as (height, width); '512' -> (512, 512)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"size must look like 1024x1024 (HxW), got {text!r}")
    return parts[0], parts[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `catpatch generate`."""
    p.add_argument("--model", required=True, help=f"required: {MODEL_HELP}")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--prompt", action="append",
        help="a prompt; repeat for more (required: this or --prompts-file)",
    )  # fmt: skip
    which.add_argument(
        "--prompts-file",
        help="prompts: .txt one per line, .jsonl/.json (prompt or caption fields, COCO "
        "captions), .tsv/.csv with a Prompt column (PartiPrompts) (required: this or --prompt)",
    )
    p.add_argument("--limit", type=positive_int, help="only the first N prompts (default: all)")
    p.add_argument(
        "--out", required=True, help="required: output folder (re-run into it to resume)"
    )
    p.add_argument(
        "--no-cat", dest="cat", action="store_false", help="the unpatched baseline (no policy)"
    )
    add_cat_options(p)
    p.add_argument("--steps", type=positive_int, default=28, help="denoising steps")
    p.add_argument(
        "--guidance", type=float, help=f"guidance scale (default: {DEFAULT_GUIDANCE}; "
        f"{TOY_GUIDANCE} with --model toy)",
    )  # fmt: skip
    p.add_argument(
        "--size", type=parse_size,
        help="HxW in pixels (default: the model's own, 1024x1024 for SD3, 64x64 for toy, "
        "96x96 for scenes)",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=0, help=f"base seed; image j of prompt i: seed+{SEED_STRIDE}i+j"
    )
    p.add_argument("--images-per-prompt", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per pipeline call")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument(
        "--lora", help="LoRA weights (folder or file) for pipe.load_lora_weights (default: none)"
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA scale")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--no-progress", dest="progress", action="store_false", help=PROGRESS_HELP)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `generate` on the `catpatch` subcommands."""
    p = subparsers.add_parser(
        "generate",
        formatter_class=HelpFormatter,
        help="generate images of a prompt list, patched or not (resumable, data-parallel)",
        description="Generate one PNG per prompt and image with an SD3-family, FLUX.1 or "
        "PixArt-Σ pipeline, patched (the default budget, --macs, or the policy --selection names) "
        "or unpatched (--no-cat), plus manifest.jsonl. Re-running into the same --out makes "
        "only missing images; under `accelerate launch`/`torchrun` each process takes a share.",
        epilog=f"Image j of prompt i is {{i:05d}}_{{j:03d}}.png from seed + {SEED_STRIDE}*i + j, "
        "so a patched run and a --no-cat run pair up by file name for `catpatch eval`.",
    )
    add_arguments(p)
    p.set_defaults(func=command)
    return p


def command(args: argparse.Namespace) -> int:
    """Run `catpatch generate` from parsed arguments; the exit code."""
    guidance = args.guidance
    if guidance is None:
        builtin = builtin_models().get(args.model)
        guidance = builtin.guidance_scale if builtin is not None else DEFAULT_GUIDANCE
    try:
        resolve_cat_options(args)
        if not args.cat and args.macs is not None:
            raise CommandError(
                f"--macs {args.macs:g} with --no-cat: the unpatched baseline has no budget; "
                f"drop one of them"
            )
        prompts = args.prompt or read_prompts(args.prompts_file)
        prompts = prompts[: args.limit] if args.limit is not None else prompts
        settings = GenerateSettings(
            model=args.model, prompts=prompts, out=args.out, cat=args.cat,
            keep_ratio=args.keep_ratio, warmup_steps=args.warmup_steps,
            num_clusters=args.num_clusters, selection=args.selection, steps=args.steps,
            macs=args.macs, forecast=args.forecast or CATConfig.forecast,
            calibration=args.calibration, guidance=guidance,
            size=args.size, seed=args.seed, images_per_prompt=args.images_per_prompt,
            batch_size=args.batch_size, dtype=args.dtype, device=args.device, lora=args.lora,
            lora_scale=args.lora_scale, compile=args.compile,
            progress=show_progress(args.progress),
        )  # fmt: skip
        check(settings)
        if args.cat and args.macs is None:
            warn_if_nothing_pruned("generate", args.steps, args.warmup_steps)
        result = run(settings)
    except CommandError as err:  # GenerateError and the shared option checks
        return fail("generate", err)
    except KeyboardInterrupt:
        print("catpatch generate: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    if result.rank != 0:
        return 0
    print(
        f"{result.total - len(result.missing)} of {plural(result.total, 'image')} in {result.out} "
        f"({result.skipped} already there, {result.generated} made by process 0 of "
        f"{result.world_size}); manifest {result.out / MANIFEST}"
    )
    if result.cat_summary:
        print(f"last batch: {result.cat_summary}")
    if result.missing:
        shown = ", ".join(result.missing[:5]) + (" ..." if len(result.missing) > 5 else "")
        print(
            f"catpatch generate: error: {plural(len(result.missing), 'image')} missing ({shown}); "
            f"re-run the same command to make them",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m catpatch.cli.generate ...`: the same as `catpatch generate ...`."""
    parser = Parser(prog="catpatch generate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))
