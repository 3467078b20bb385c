"""`catpatch generate`: images of a prompt list with or without CAT; resumable, data-parallel.

    catpatch generate --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --prompts-file prompts.txt --out out/cat                 # CAT (keep ratio 0.3, t0 8)
    catpatch generate ... --no-cat --out out/base                # same seeds and file names
    accelerate launch --num_processes 8 -m catpatch generate ...  # one share per GPU

Image j of prompt i is `{i:05d}_{j:03d}.png`, made from the CPU generator seeded with
`seed + 1000*i + j`, so two runs over the same prompts pair up by file name (`catpatch eval`).
Each PNG is written atomically (temp file + rename); only then is its line appended to the
manifest (prompt, seed, settings, time and the CAT figures of its batch). A re-run into the same
`--out` makes only the images that are missing. Under `accelerate launch` or `torchrun` every
process takes a contiguous share of the missing images and appends to its own shard
`manifest.rank{r}.jsonl`; at the end the main process merges all shards into `manifest.jsonl`
(one line per file name, in prompt order) and reports any image that is still missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...dtypes import DTYPE_NAMES, default_dtype_name, from_pretrained_dtype, torch_dtype

MANIFEST = "manifest.jsonl"
SHARD_GLOB = "manifest.rank*.jsonl"
SEED_STRIDE = 1000  # seed of image j of prompt i: seed + SEED_STRIDE*i + j
# Settings that change the pixels: a resumed run must match the images already in --out.
GENERATION_KEYS = (
    "model", "cat", "keep_ratio", "warmup_steps", "num_clusters", "steps", "guidance",
    "height", "width", "seed", "dtype", "lora", "lora_scale",
)  # fmt: skip
PROMPT_COLUMNS = ("prompt", "caption", "text")


class GenerateError(RuntimeError):
    """A user error of `catpatch generate`; the message names the fix."""


@dataclass
class GenerateSettings:
    """What `catpatch generate` makes; the fields mirror the command-line options."""

    model: str
    prompts: list[str]
    out: str | Path
    cat: bool = True
    keep_ratio: float = 0.3
    warmup_steps: int = 8
    num_clusters: int = 20
    steps: int = 28
    guidance: float = 7.0
    size: tuple[int, int] | None = None  # (height, width); None: the model's native size
    seed: int = 0
    images_per_prompt: int = 1
    batch_size: int = 1
    dtype: str | None = None  # bf16 on cuda, fp32 elsewhere
    device: str | None = None  # cuda if available (the process's GPU under a launcher), else cpu
    lora: str | None = None
    lora_scale: float = 1.0
    compile: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return f"{self.prompt_index:05d}_{self.image_index:03d}.png"


@dataclass
class GenerateResult:
    """What a `run` did (in this process; `missing` is filled in on the main process)."""

    out: Path
    total: int  # images the prompt list asks for
    skipped: int  # already in --out before this run
    generated: int  # made by this process
    rank: int = 0
    world_size: int = 1
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cat_summary: str | None = None


def jobs_for(prompts: Sequence[str], images_per_prompt: int, seed: int) -> list[Job]:
    """Every image of a run, in prompt order."""
    return [
        Job(i, j, prompt, seed + SEED_STRIDE * i + j)
        for i, prompt in enumerate(prompts)
        for j in range(images_per_prompt)
    ]


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts of a file: `.txt` one per line (blank lines skipped); `.jsonl` objects with a
    prompt/caption/text field (or strings); `.json` a list of strings or a COCO captions file
    (`annotations[*].caption`); `.tsv`/`.csv` with a Prompt/caption/text column (PartiPrompts).
    """
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"prompts file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            prompts = [_prompt_of(row) for row in rows]
        elif suffix == ".json":
            data = json.loads(text)
            rows = data["annotations"] if isinstance(data, dict) else data
            prompts = [_prompt_of(row) for row in rows]
        elif suffix in (".tsv", ".csv"):
            reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
            prompts = [_prompt_of(row) for row in reader]
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as err:
        raise GenerateError(f"cannot read prompts from {path}: {err}") from None
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise GenerateError(f"prompts file {path} holds no prompts")
    return prompts


def _prompt_of(row: Any) -> str:
    if isinstance(row, str):
        return row.strip()
    keys = {k.lower(): k for k in row if isinstance(k, str)}
    for name in PROMPT_COLUMNS:
        if name in keys:
            return str(row[keys[name]]).strip()
    raise KeyError(f"no {'/'.join(PROMPT_COLUMNS)} field in {row!r}")


# ---- the manifest ----------------------------------------------------------------------------
def read_records(out: str | Path) -> dict[str, dict[str, Any]]:
    """Manifest records of a `generate` folder by file name: `manifest.jsonl`, then the shards
    of an unfinished run (a later line for the same file wins; torn lines are skipped)."""
    out = Path(out)
    records: dict[str, dict[str, Any]] = {}
    for path in [out / MANIFEST, *sorted(out.glob(SHARD_GLOB))]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the last line of a killed run
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                records[record["file"]] = record
    return records


def merge_manifest(out: str | Path, jobs: Sequence[Job]) -> list[str]:
    """Rewrite `manifest.jsonl` from all records whose PNG exists (one line per file, prompt
    order), remove the shards; return the file names of `jobs` that are still missing."""
    out = Path(out)
    records = {f: r for f, r in read_records(out).items() if (out / f).is_file()}
    ordered = sorted(records.values(), key=lambda r: (r["prompt_index"], r["image_index"]))
    _write_atomic(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in ordered))
    for shard in out.glob(SHARD_GLOB):
        shard.unlink()
    return [job.file for job in jobs if job.file not in records]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_png(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _completed(out: Path, jobs: Sequence[Job], settings: dict[str, Any]) -> set[str]:
    """File names of `jobs` already made (PNG and record); error if made differently."""
    by_file = {job.file: job for job in jobs}
    done = set()
    for name, record in read_records(out).items():
        job = by_file.get(name)
        if job is None or not (out / name).is_file():
            continue
        old = record.get("settings", {})
        made = {"prompt": record.get("prompt"), "seed": record.get("seed")}
        wanted = {"prompt": job.prompt, "seed": job.seed}
        keys = [k for k in GENERATION_KEYS if k not in ("height", "width") or settings[k]]
        made.update({k: old.get(k) for k in keys})
        wanted.update({k: settings[k] for k in keys})
        for key, value in wanted.items():
            if made[key] != value:
                raise GenerateError(
                    f"{out / name} was made with {key}={made[key]!r}, this run asks for "
                    f"{value!r}: use another --out, or the same settings to resume"
                )
        done.add(name)
    return done


# ---- the pipeline ----------------------------------------------------------------------------
def _looks_like_path(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") != 1


def load_pipeline(model: str, device: Any, dtype: Any):
    """`DiffusionPipeline.from_pretrained(model)` on `device` in `dtype`, with clear errors."""
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise GenerateError(
                f"{model} is not a diffusers pipeline folder (no model_index.json): pass the "
                f"folder written by pipe.save_pretrained(...) or a hub id"
            )
        model = str(path)
    elif _looks_like_path(model):
        raise GenerateError(
            f"model folder {model} does not exist: pass a pipeline folder (pipe.save_pretrained) "
            f"or a hub id such as stabilityai/stable-diffusion-3-medium-diffusers"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **from_pretrained_dtype(dtype))
    except (OSError, ValueError) as err:
        raise GenerateError(
            f"could not load {model}: {first_line(err)} (a hub model needs network access and, "
            f"for gated models, `hf auth login`; offline, pass a local folder)"
        ) from None
    return pipe.to(device)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type name if it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _as_text_to_image(pipe):
    """The SD3 text-to-image pipeline of `pipe`; GenerateError if it is not SD3-family."""
    from diffusers import StableDiffusion3Pipeline

    from ...patching import is_supported_pipeline

    if isinstance(pipe, StableDiffusion3Pipeline):
        return pipe
    if not is_supported_pipeline(pipe):
        raise GenerateError(
            f"{type(pipe).__name__} is not a supported SD3-family pipeline; catpatch generate "
            f"needs a StableDiffusion3Pipeline checkpoint (SD3-medium, SD3.5-medium/large)"
        )
    return StableDiffusion3Pipeline.from_pipe(pipe)


def check_size(pipe, height: int, width: int, num_clusters: int | None = None) -> None:
    """GenerateError unless HxW fits the model: multiples of VAE scale × patch size, within the
    position embedding, and (for CAT) at least `num_clusters` image tokens."""
    vae = int(pipe.vae_scale_factor)
    config = pipe.transformer.config
    patch = int(config.patch_size)
    unit = vae * patch
    if height % unit or width % unit or height <= 0 or width <= 0:
        fit = "x".join(str(max(unit, round(v / unit) * unit)) for v in (height, width))
        raise GenerateError(
            f"--size {height}x{width}: height and width must be positive multiples of {unit} "
            f"(VAE scale factor {vae} x patch size {patch}) for this model, e.g. {fit}"
        )
    limit = getattr(config, "pos_embed_max_size", None)
    if limit and max(height, width) > limit * unit:
        raise GenerateError(
            f"--size {height}x{width}: this model's position embedding allows at most "
            f"{limit * unit} pixels per side"
        )
    tokens = (height // unit) * (width // unit)
    if num_clusters is not None and num_clusters > tokens:
        raise GenerateError(
            f"--num-clusters {num_clusters} exceeds the {tokens} image tokens at {height}x{width}:"
            f" lower --num-clusters or raise --size"
        )


def _cat_config(settings: GenerateSettings):
    from ...config import CATConfig

    try:
        return CATConfig(
            keep_ratio=settings.keep_ratio,
            warmup_steps=settings.warmup_steps,
            num_clusters=settings.num_clusters,
            compile="default" if settings.compile else None,
        )
    except ValueError as err:
        raise GenerateError(str(err)) from None


def _cat_figures(pipe) -> dict[str, Any]:
    from ... import cat_stats

    s = cat_stats(pipe)
    return {
        "steps": s.steps,
        "pruned_steps": s.pruned_steps,
        "S": s.budget,
        "L": s.tokens,
        "T": s.text_tokens,
        "computed_fraction": s.computed_fraction,
        "macs_ratio": s.macs_ratio,
    }


def _prepare(pipe, settings: GenerateSettings, height: int, width: int):
    """LoRA, then CAT or torch.compile; returns (pipeline, extra call kwargs)."""
    check_size(pipe, height, width, settings.num_clusters if settings.cat else None)
    extra: dict[str, Any] = {}
    if settings.lora:
        try:
            pipe.load_lora_weights(settings.lora)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
            message = f"could not load the LoRA {settings.lora}: {first_line(err)}"
            raise GenerateError(message) from None
        extra["joint_attention_kwargs"] = {"scale": settings.lora_scale}
    if settings.cat:
        from ...patching import apply_cat

        try:
            apply_cat(pipe, _cat_config(settings))
        except (TypeError, ValueError) as err:
            raise GenerateError(str(err)) from None
    elif settings.compile:
        pipe.transformer.compile()
    return pipe, extra


def _oom_message(batch_size: int, height: int, width: int) -> str:
    return (
        f"out of memory at --batch-size {batch_size}, {height}x{width}: lower "
        f"--batch-size or --size, use --dtype bf16, or load the pipeline yourself with "
        f"pipe.enable_model_cpu_offload() and pass it to "
        f"catpatch.cli.generate.run(settings, pipe=pipe); re-run the same command to resume"
    )


# ---- the run ---------------------------------------------------------------------------------
def run(
    settings: GenerateSettings,
    pipe: Any = None,
    on_image: Callable[[dict[str, Any]], None] | None = None,
) -> GenerateResult:
    """Make every image of `settings` not yet in `settings.out` (this process's share under a
    launcher). `pipe`: an already loaded pipeline to use instead of loading `settings.model`
    (patched in place, not moved). `on_image(record)` runs after each image is written and
    recorded. Raises `GenerateError` for user errors."""
    import torch
    from accelerate import PartialState

    started = time.perf_counter()
    _check(settings)
    wanted = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    state = PartialState(cpu=wanted.startswith("cpu"))  # plain PartialState() misreads torchrun
    on_state = wanted == "cuda" and state.device.type == "cuda"  # the process's own GPU
    device = state.device if on_state else torch.device(wanted)
    recorded = _recorded(settings, device, state.num_processes, loaded=pipe is not None)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(settings.prompts, settings.images_per_prompt, settings.seed)
    done = _completed(out, jobs, recorded)  # every process reads the same snapshot
    pending = [job for job in jobs if job.file not in done]
    result = GenerateResult(out, len(jobs), len(done), 0, state.process_index, state.num_processes)
    if state.is_main_process:
        for tmp in out.glob(".*.tmp"):  # left by a killed run
            tmp.unlink(missing_ok=True)
    state.wait_for_everyone()  # nobody writes before every process has read

    oom = None
    with state.split_between_processes(pending) as mine:
        if mine:
            if pipe is None:
                pipe = load_pipeline(settings.model, device, torch_dtype(recorded["dtype"]))
            pipe = _as_text_to_image(pipe)
            if recorded["height"] is None:
                side = pipe.default_sample_size * pipe.vae_scale_factor
                recorded.update(height=side, width=side)
            pipe, extra = _prepare(pipe, settings, recorded["height"], recorded["width"])
            oom = _generate_share(
                pipe, extra, mine, out, recorded, state, settings.progress, on_image, result
            )
    if oom is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    state.wait_for_everyone()
    if state.is_main_process:
        result.missing = merge_manifest(out, jobs)
    result.seconds = time.perf_counter() - started
    if oom is not None:
        raise GenerateError(oom)
    return result


def _check(settings: GenerateSettings) -> None:
    if not settings.prompts:
        raise GenerateError("no prompts: pass --prompt or --prompts-file")
    if not 1 <= settings.images_per_prompt <= SEED_STRIDE:
        raise GenerateError(f"--images-per-prompt must be in 1..{SEED_STRIDE}")
    if settings.batch_size < 1 or settings.steps < 1:
        raise GenerateError("--batch-size and --steps must be >= 1")
    if settings.dtype not in (None, *DTYPE_NAMES):
        raise GenerateError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}")
    if settings.cat:
        _cat_config(settings)


def _recorded(settings: GenerateSettings, device, world_size: int, loaded: bool) -> dict:
    """The settings every manifest line carries (height/width None until the model is known)."""
    model = settings.model
    if not loaded and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    height, width = settings.size or (None, None)
    cat = settings.cat
    return {
        "model": model, "cat": cat, "keep_ratio": settings.keep_ratio if cat else None,
        "warmup_steps": settings.warmup_steps if cat else None,
        "num_clusters": settings.num_clusters if cat else None,
        "steps": settings.steps, "guidance": settings.guidance, "height": height, "width": width,
        "seed": settings.seed, "images_per_prompt": settings.images_per_prompt,
        "batch_size": settings.batch_size,
        "dtype": settings.dtype or default_dtype_name(device),
        "device": str(device), "lora": settings.lora,
        "lora_scale": settings.lora_scale if settings.lora else None,
        "compile": settings.compile, "world_size": world_size,
    }  # fmt: skip


def _generate_share(pipe, extra, mine, out, recorded, state, show, on_image, result) -> str | None:
    """Make the images `mine` in batches; the out-of-memory message if the device ran out."""
    import torch
    from tqdm.auto import tqdm

    from ... import cat_stats

    show = show and state.is_main_process
    pipe.set_progress_bar_config(disable=not show, leave=False)
    shard = out / f"manifest.rank{state.process_index}.jsonl"
    where = f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""
    bar = tqdm(total=len(mine), unit="img", desc=f"images{where}", disable=not show)
    height, width, size = recorded["height"], recorded["width"], recorded["batch_size"]
    try:
        for first in range(0, len(mine), size):
            batch = mine[first : first + size]
            tick = time.perf_counter()
            try:
                images = pipe(
                    prompt=[job.prompt for job in batch], height=height, width=width,
                    num_inference_steps=recorded["steps"], guidance_scale=recorded["guidance"],
                    generator=[torch.Generator().manual_seed(job.seed) for job in batch],
                    output_type="pil", **extra,
                ).images  # fmt: skip
            except torch.OutOfMemoryError:
                return _oom_message(size, height, width)
            seconds = time.perf_counter() - tick
            figures = _cat_figures(pipe) if recorded["cat"] else None
            for job, image in zip(batch, images, strict=True):
                _save_png(image, out / job.file)
                record = {
                    "file": job.file, "prompt": job.prompt, "prompt_index": job.prompt_index,
                    "image_index": job.image_index, "seed": job.seed,
                    "rank": state.process_index, "time_s": seconds / len(batch),
                    "batch_time_s": seconds, "batch_images": len(batch),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "settings": recorded, "cat": figures,
                }  # fmt: skip
                _append(shard, record)
                result.generated += 1
                bar.update(1)
                if on_image is not None:
                    on_image(record)
        if recorded["cat"]:
            result.cat_summary = cat_stats(pipe).summary()
    finally:
        bar.close()
    return None


# ---- the command line ------------------------------------------------------------------------
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
    p.add_argument("--model", required=True, help="pipeline folder (save_pretrained) or hub id")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    which.add_argument(
        "--prompts-file",
        help="prompts: .txt one per line, .jsonl/.json (prompt or caption fields, COCO "
        "captions), .tsv/.csv with a Prompt column (PartiPrompts)",
    )
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--out", required=True, help="output folder (re-run into it to resume)")
    p.add_argument("--no-cat", dest="cat", action="store_false", help="the unpatched baseline")
    p.add_argument("--keep-ratio", type=float, default=0.3, help="CAT alpha (0.3)")
    p.add_argument("--warmup-steps", type=int, default=8, help="CAT t0, full steps first (8)")
    p.add_argument("--num-clusters", type=int, default=20, help="CAT spatial clusters (20)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (28)")
    p.add_argument("--guidance", type=float, default=7.0, help="guidance scale (7.0)")
    p.add_argument(
        "--size", type=parse_size, help="HxW in pixels (default: the model's, 1024x1024 for SD3)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help=f"base seed; image j of prompt i: seed+{SEED_STRIDE}i+j"
    )
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (1)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--lora", help="LoRA weights (folder or file) for pipe.load_lora_weights")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA scale (1.0)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no bars")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `generate` on the `catpatch` subcommands."""
    p = subparsers.add_parser(
        "generate",
        help="generate images of a prompt list with or without CAT (resumable, data-parallel)",
        description="Generate one PNG per prompt and image with an SD3-family pipeline, with "
        "CAT (default) or --no-cat, plus manifest.jsonl. Re-running into the same --out makes "
        "only missing images; under `accelerate launch`/`torchrun` each process takes a share.",
        epilog=f"Image j of prompt i is {{i:05d}}_{{j:03d}}.png from seed + {SEED_STRIDE}*i + j, "
        "so a CAT run and a --no-cat run pair up by file name for `catpatch eval`.",
    )
    add_arguments(p)
    p.set_defaults(func=command)
    return p


def command(args: argparse.Namespace) -> int:
    """Run `catpatch generate` from parsed arguments; the exit code."""
    try:
        prompts = args.prompt or read_prompts(args.prompts_file)
        prompts = prompts[: args.limit] if args.limit is not None else prompts
        settings = GenerateSettings(
            model=args.model, prompts=prompts, out=args.out, cat=args.cat,
            keep_ratio=args.keep_ratio, warmup_steps=args.warmup_steps,
            num_clusters=args.num_clusters, steps=args.steps, guidance=args.guidance,
            size=args.size, seed=args.seed, images_per_prompt=args.images_per_prompt,
            batch_size=args.batch_size, dtype=args.dtype, device=args.device, lora=args.lora,
            lora_scale=args.lora_scale, compile=args.compile, progress=args.progress,
        )  # fmt: skip
        result = run(settings)
    except GenerateError as err:
        print(f"catpatch generate: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("catpatch generate: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    if result.rank != 0:
        return 0
    print(
        f"{result.total - len(result.missing)} of {result.total} images in {result.out} "
        f"({result.skipped} already there, {result.generated} made by process 0 of "
        f"{result.world_size}, {result.seconds:.1f} s); manifest {result.out / MANIFEST}"
    )
    if result.cat_summary:
        print(f"last batch: {result.cat_summary}")
    if result.missing:
        shown = ", ".join(result.missing[:5]) + (" ..." if len(result.missing) > 5 else "")
        print(
            f"catpatch generate: error: {len(result.missing)} images missing ({shown}); "
            f"re-run the same command to make them",
            file=sys.stderr,
        )
        return 1
    return 0


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m catpatch.cli.generate ...`: the same as `catpatch generate ...`."""
    parser = argparse.ArgumentParser(prog="catpatch generate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))
