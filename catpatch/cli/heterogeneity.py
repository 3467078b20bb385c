"""`catpatch heterogeneity`: how unevenly the model output changes over the tokens, unpatched.

    catpatch heterogeneity --model toy --images 8 --steps 28 --warmup-steps 8 --out DIR

Runs the unpatched pipeline on captions (the toy's evaluation captions and seeds by default,
or `--prompts-file`), records the velocity per image token at every step and writes, per step
(`catpatch.analysis.heterogeneity`): the share of the per-token change carried by the top 30%
of tokens, the rank correlation of the change with the previous step's and with the change at
step t0-1 (CAT's first selection), and the change relative to the output. Writes
heterogeneity.jsonl (one row per step, then a summary row), heterogeneity.md and
heterogeneity.png (change maps: rows = images, columns = steps, each map normalised).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np

FILES = ("heterogeneity.jsonl", "heterogeneity.md", "heterogeneity.png")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..analysis.heterogeneity import ROWS
    from ..dtypes import DTYPE_NAMES
    from .common import MODEL_HELP, HelpFormatter, positive_int
    from .generate import parse_size

    p = subparsers.add_parser(
        "heterogeneity",
        help="how unevenly the output changes over the tokens per step (unpatched)",
        description="Run the unpatched pipeline and measure, per step, how unevenly the "
        "velocity changes over the image tokens (top-30% share of the change, rank correlation "
        "with the previous step and with CAT's first-selection step); write JSON lines, a "
        "Markdown table and a PNG of change maps.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="toy", help=MODEL_HELP)
    p.add_argument("--images", type=positive_int, default=8, help="captions (one image each)")
    p.add_argument(
        "--prompts-file",
        help="captions as `catpatch generate` reads them; image i uses seed --seed + i "
        "(default: the built-in model's evaluation captions with their own seeds; the toy's "
        "for a folder or hub id)",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed with --prompts-file")
    p.add_argument("--steps", type=positive_int, default=28, help="denoising steps")
    p.add_argument(
        "--warmup-steps", type=int, default=8,
        help="CAT t0: steps from t0 on are the pruned ones; step t0-1 is the reference change",
    )  # fmt: skip
    p.add_argument(
        "--top-fraction", type=float, default=0.3,
        help="share of the tokens whose part of the total change is reported (CAT alpha)",
    )  # fmt: skip
    p.add_argument(
        "--rows", default="guided", choices=ROWS,
        help="under CFG: the guided velocity the sampler integrates, or the conditional row "
        "(what CAT's selection reads)",
    )  # fmt: skip
    p.add_argument(
        "--guidance", type=float,
        help="guidance scale (default: a built-in model's own, 5.0 for toy; else the "
        "pipeline's)",
    )  # fmt: skip
    p.add_argument(
        "--size", type=parse_size,
        help="HxW in pixels (default: a built-in model's own, 64x64 for toy; else the model's "
        "own)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per pipeline call")
    p.add_argument(
        "--picture-images", type=int, default=4, help="images (rows) in the PNG of change maps"
    )
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--out", default="out/heterogeneity", help="output folder")
    p.set_defaults(func=command)
    return p


def _builtin(model: str):
    """The shipped trained model of a built-in `--model` name (its evaluation captions and
    call settings: `eval_prompts(n)`, `call_kwargs`), or None for a folder or hub id."""
    from ..trained import builtin_models

    return builtin_models().get(model)


def _captions(args) -> tuple[list[str], list[int]]:
    if args.prompts_file:
        from .generate.prompts import read_prompts

        prompts = read_prompts(args.prompts_file, limit=args.images)
        return prompts, [args.seed + i for i in range(len(prompts))]
    from .. import toy

    cases = (_builtin(args.model) or toy.MODEL).eval_prompts(args.images)
    return [c.prompt for c in cases], [c.seed for c in cases]


def _call_kwargs(args) -> dict[str, Any]:
    builtin = _builtin(args.model)
    kwargs: dict[str, Any] = dict(builtin.call_kwargs) if builtin is not None else {}
    kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    if args.size is not None:
        kwargs["height"], kwargs["width"] = args.size
    return kwargs


def command(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import heterogeneity as het
    from ..dtypes import default_dtype_name, torch_dtype
    from .common import CommandError, check_device, output_folder
    from .generate.pipeline import _as_text_to_image, check_size, load_pipeline

    if not 2 <= args.warmup_steps < args.steps:
        raise CommandError(
            f"--warmup-steps {args.warmup_steps}: must be in [2, --steps - 1] (step t0-2 is "
            f"CAT's reference, t0-1 its first selection, t0.. the pruned steps)"
        )
    if not 0 < args.top_fraction <= 1:
        raise CommandError(f"--top-fraction {args.top_fraction}: must be in (0, 1]")
    check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(args.dtype or default_dtype_name(device))
    prompts, seeds = _captions(args)
    pipe = _as_text_to_image(load_pipeline(args.model, device, dtype))
    pipe.set_progress_bar_config(disable=True)
    kwargs = _call_kwargs(args)
    if "height" in kwargs:
        check_size(pipe, kwargs["height"], kwargs["width"])
    started = time.perf_counter()
    recording = het.record_velocities(
        pipe, prompts, seeds, rows=args.rows, batch_size=args.batch_size, **kwargs
    )
    seconds = time.perf_counter() - started
    stats = het.step_stats(recording.velocity, args.warmup_steps, args.top_fraction)
    average = het.pruned_average(stats)
    tokens = recording.velocity.shape[2]
    summary = {
        "summary": True,
        "model": args.model,
        "images": len(prompts),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "top_fraction": args.top_fraction,
        "top_tokens": het.top_count(tokens, args.top_fraction),
        "tokens": tokens,
        "grid": list(recording.grid),
        "rows": args.rows if pipe.do_classifier_free_guidance else "no cfg",
        "guidance_scale": pipe.guidance_scale,
        "pruned_average": average,
        "seconds": round(seconds, 1),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "machine": machine(device),
        "torch": torch.__version__,
        "command": command_line(args),
    }
    with output_folder(args.out) as out:
        lines = [json.dumps(s.row()) for s in stats] + [json.dumps(summary)]
        (out / FILES[0]).write_text("\n".join(lines) + "\n")
        table = markdown(stats, summary)
        (out / FILES[1]).write_text(table)
        change = het.token_change(recording.velocity)
        picture(change, recording, prompts, args.warmup_steps, args.picture_images).save(
            out / FILES[2]
        )
    print(table, end="")
    print(f"wrote {', '.join(FILES)} to {args.out}")
    return 0


def machine(device: str) -> str:
    """The device in words: the GPU's name, or the CPU model and torch's thread count."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} threads"


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (every option that shapes the numbers)."""
    parts = ["catpatch", "heterogeneity", "--model", args.model, "--images", str(args.images)]
    if args.prompts_file:
        parts += ["--prompts-file", args.prompts_file, "--seed", str(args.seed)]
    parts += ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    if args.top_fraction != 0.3:
        parts += ["--top-fraction", str(args.top_fraction)]
    if args.rows != "guided":
        parts += ["--rows", args.rows]
    if args.guidance is not None:
        parts += ["--guidance", str(args.guidance)]
    if args.size is not None:
        parts += ["--size", "x".join(map(str, args.size))]
    for option in ("dtype", "device"):
        if getattr(args, option):
            parts += [f"--{option}", getattr(args, option)]
    return shlex.join(parts + ["--out", args.out])


def _cell(value: float | None, se: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if se is None or not np.isfinite(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def markdown(stats, summary: dict[str, Any]) -> str:
    """The per-step table with the average over the pruned steps (mean ± standard error over
    images per step)."""
    s = summary
    head = (
        f"# Change heterogeneity, unpatched: {s['model']}, {s['images']} images, {s['steps']} "
        f"steps, warm-up t0 = {s['warmup_steps']}\n\n"
        f"Per token c_t = ||v_t - v_(t-1)|| ({s['tokens']} tokens, velocity: {s['rows']}). "
        f"top share: part of the total change carried by the top {s['top_tokens']} tokens "
        f"(uniform = {s['top_tokens'] / s['tokens']:.3f}); rho(t, t-1): Spearman rank "
        f"correlation of c_t with c_(t-1); rho(t, ref): with c at step t0-1 = "
        f"{s['warmup_steps'] - 1} (CAT's first-selection drift); relative change: "
        f"sum c_t / sum ||v_(t-1)||. Mean ± standard error over images.\n\n"
    )
    rows = [
        "| step | phase | top share | rho(t, t-1) | rho(t, ref) | relative change |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for st in stats:
        row = st.row()
        cells = [
            _cell(row[name], row[f"{name}_se"])
            for name in ("top_share", "step_rho", "reference_rho", "relative_change")
        ]
        phase = "pruned" if st.pruned else "warm-up"
        rows.append(f"| {st.step} | {phase} | " + " | ".join(cells) + " |")
    a = s["pruned_average"]
    rows.append(
        f"| **{s['warmup_steps']}-{s['steps'] - 1}** | **pruned mean** | "
        + " | ".join(
            f"**{a[name]:.3f}**"
            for name in ("top_share", "step_rho", "reference_rho", "relative_change")
        )
        + " |"
    )
    foot = (
        f"\n\n{s['device']} ({s['machine']}), {s['dtype']}, torch {s['torch']}, "
        f"{s['seconds']} s to generate.\n"
    )
    foot += f"Command: `{s['command']}`\n"
    return head + "\n".join(rows) + foot


def _hot(maps: np.ndarray) -> np.ndarray:
    """[0, 1] maps (..., H, W) as RGB uint8 on a black-red-yellow-white ramp."""
    x = np.clip(maps, 0.0, 1.0)[..., None]
    rgb = np.clip(np.concatenate([3 * x, 3 * x - 1, 3 * x - 2], axis=-1), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def picture(change, recording, prompts: list[str], warmup_steps: int, count: int):
    """Rows = the first `count` images (their final image first), columns = the steps from
    t0-1 (CAT's reference change) to the last; each change map normalised to its maximum."""
    from PIL import Image

    from ..analysis.heterogeneity import normalised_maps
    from .pictures import Figure, Swatch, to_uint8, upscale

    height, width = recording.grid
    count = max(1, min(count, change.shape[0]))
    steps = list(range(warmup_steps - 1, change.shape[1]))
    maps = normalised_maps(change[:count, steps], height, width).numpy()
    cell = max(1, 64 // max(height, width))
    tiles = []
    for i in range(count):
        size = (width * cell, height * cell)
        image = Image.fromarray(to_uint8(recording.images[i])).resize(size, Image.BILINEAR)
        row = [np.asarray(image)] + [upscale(_hot(m), cell) for m in maps[i]]
        tiles.append(row)
    columns = ["image"] + [f"t={t}" + (" ref" if t == warmup_steps - 1 else "") for t in steps]
    ramp = _hot(np.linspace(0, 1, 64)[None].repeat(8, 0))
    return Figure(
        tiles,
        title="Per-token change ||v_t - v_(t-1)|| of the unpatched model, each map normalised",
        columns=columns,
        rows=[f"{i}: {p}" for i, p in enumerate(prompts[:count])],
        legend=[Swatch(ramp, "0 ... the map's largest change")],
        caption=f"Columns: the final image, then steps {steps[0]} (t0-1: the change CAT's first "
        f"selection reads) to {steps[-1]}.",
        wrap_columns=11,
        text_size=12,
    )
