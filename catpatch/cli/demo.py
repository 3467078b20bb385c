"""`catpatch demo`: catpatch on the embedded offline pipeline, with pictures of what it did.

Generates the same prompts unpatched and patched (the default budget, `--macs`, or any
`--selection`) and writes, each picture with its title, headings, legend and caption:
- `compare.png`: one row per prompt: unpatched | patched | |difference| x4, with the PSNR of
  the patched image against the unpatched one;
- `tokens.png` / `tokens.gif` (token policies such as `--selection cat`): which image tokens
  were recomputed at each pruned step;
- `clusters.png` (CAT's selections): the spatial clusters CAT made (over the patched image);
- `summary.json`: the policy that ran (`selection`, `policy`; with a budget `macs` and the
  plan's `computed_steps`) and its whole config, the savings
  (MACs, tokens), PSNR per image, `cat_stats`, the catpatch version and the warm timings
  (`median_unpatched_s`, `median_patched_s`, ...): `repeats` alternating runs of each side after
  one warm-up run of each (none with repeats=0), checked against the arithmetic bound
  1 / MACs ratio (`timing.py`).

Steps are counted from 1 in every picture and line (step 1 is the first denoising step).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, policies
from ..config import CATConfig
from ..patching import apply_cat, get_patch, is_patched, remove_cat
from ..schedule import Mode
from .pictures import (
    Figure,
    Swatch,
    number_regions,
    outline_cells,
    region_borders,
    to_uint8,
    upscale,
)
from .timing import busy_note, load_average, time_pair

# Captions the toy model renders well with seeds 0, 1, 2, 3 (image i uses seed + i); the toy
# only knows its procedural vocabulary (see `catpatch.toy.data`).
DEMO_PROMPTS = (
    "a large red circle at the top left on a striped blue background",
    "a large yellow square at the bottom right on a plain purple background",
    "a large blue square at the left on a checkered green background",
    "a medium white square at the top on a checkered yellow background",
)
TOY_NOTE = (
    "Toy model: a small SD3 pipeline (6 transformer blocks, 64x64 px, 256 image tokens) trained "
    "for catpatch on procedural shapes and shipped inside it - a test bed for pruning, not a good "
    "image generator."
)
TIMING_NOTE = (
    "warm runs (after one warm-up run of each), unpatched and patched (the policy named by "
    "`policy`) alternating, medians when "
    "more than one; the whole pipeline (text encoders, denoising, VAE) on this machine. The "
    "speed-up cannot exceed the bound 1 / macs_ratio; `plausible` is false when it did (a busy "
    "machine), even after re-measuring. `catpatch bench` times the denoising loop alone."
)


def load_demo_pipeline(
    model: str = "toy", device: str | None = None
) -> tuple[Any, dict[str, Any], str]:
    """The pipeline of the demo: (pipeline, call kwargs, description). `model` is `toy` or
    `scenes` (the pipelines shipped in catpatch) or an SD3-family pipeline folder / hub id."""
    from ..trained import builtin_models

    builtin = builtin_models().get(model)
    if builtin is not None:
        pipe = builtin.load_pipeline(device=device)
        note = TOY_NOTE if model == "toy" else f"Model: {builtin.description}."
        return pipe, dict(builtin.call_kwargs), note
    from ..dtypes import default_dtype_name, torch_dtype
    from .generate import load_pipeline
    from .generate.pipeline import _as_text_to_image

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = _as_text_to_image(load_pipeline(model, device, torch_dtype(default_dtype_name(device))))
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(num_inference_steps=28, guidance_scale=7.0), f"Model: {model}."


def default_pipeline(device: str | None = None) -> tuple[Any, dict[str, Any], str]:
    """The embedded offline default: the trained toy pipeline shipped in the package."""
    return load_demo_pipeline("toy", device)


def _palette(count: int) -> np.ndarray:
    """`count` distinct colours (golden-angle hues), floats in [0, 1]."""
    import colorsys

    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.65, 0.95) for h in hues])


def run_demo(
    out: str | Path,
    prompts: tuple[str, ...] | list[str] = DEMO_PROMPTS,
    config: CATConfig | None = None,
    seed: int = 0,
    device: str | None = None,
    model: str = "toy",
    repeats: int = 3,
    progress: bool = False,
    **call_overrides: Any,
) -> dict[str, Any]:
    """Run the demo into folder `out` (created once the images exist); returns the summary
    that is also saved as `summary.json` (plus `summary_text`).

    Image i of `prompts` is made from seed `seed + i`. `repeats` warm timed runs of each side
    (0: no timing), re-measured once if their speed-up exceeds the arithmetic bound.
    `call_overrides` go to the pipeline call (e.g. `num_inference_steps`).
    """
    from tqdm.auto import tqdm

    from .. import cat_stats

    load = load_average()  # before this run adds its own
    pipe, call, source = load_demo_pipeline(model, device)
    call.update(call_overrides)
    config = config or CATConfig()
    prompts = list(prompts)
    steps = int(call["num_inference_steps"])
    bar = tqdm(total=(2 + 2 * repeats) * steps, desc="demo", unit="step", disable=not progress)

    def generate(record=None) -> tuple[np.ndarray, float]:
        def on_step(p, step, timestep, kwargs):
            if bar.n >= bar.total:  # re-measuring: more runs than planned
                bar.total += steps
            bar.update(1)
            return record(p, step, timestep, kwargs) if record else kwargs

        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        start = time.perf_counter()
        images = pipe(
            prompt=prompts, generator=generators, output_type="np",
            callback_on_step_end=on_step, **call,
        ).images  # fmt: skip
        return images, time.perf_counter() - start

    try:
        baseline, _ = generate()  # the pictures; also the warm-up of the unpatched path
        apply_cat(pipe, config)
        state = get_patch(pipe).state
        masks: list[np.ndarray] = []
        pruned_steps: list[int] = []
        clusters: list[np.ndarray] = []

        def record(p, step, timestep, kwargs):
            # Host copies for the pictures only (after the step); pruned steps never sync.
            geo, groups = state.schedule.geometry, state.schedule.groups
            labels = getattr(state.tokens, "labels", None)
            if labels is not None and not clusters:
                clusters.append(labels.cpu().numpy().reshape(-1, geo.height, geo.width))
            if state.log.steps and state.log.steps[-1].mode is Mode.PRUNED:
                computed = state.index[:groups].cpu().numpy()  # this step's selection
                mask = np.zeros((groups, geo.tokens), dtype=bool)
                np.put_along_axis(mask, computed, True, axis=1)
                masks.append(mask.reshape(-1, geo.height, geo.width))
                pruned_steps.append(step + 1)
            return kwargs

        cat_images, _ = generate(record)  # the pictures; also the warm-up of the patched path
        stats = cat_stats(pipe)

        def unpatched() -> float:
            if is_patched(pipe):
                remove_cat(pipe)
            return generate()[1]

        def patched() -> float:
            if not is_patched(pipe):
                apply_cat(pipe, config)
            return generate()[1]

        # warm, alternating: both sides see the same machine load; checked against the bound
        timing = time_pair(unpatched, patched, repeats, 1 / stats.macs_ratio) if repeats else None
    finally:
        bar.close()
        remove_cat(pipe)

    if config.budgeted:  # the plan's steps, counted from 1
        settings = f"{config.forecast} forecast, steps {stats.plan.describe()} of {steps} computed"
    else:
        settings = (
            f"keep_ratio {config.keep_ratio}, warmup_steps {config.warmup_steps}, "
            + (f"{config.num_clusters} clusters, " if state.tokens is not None else "")
            + f"{steps} steps"
        )
    out = Path(out)  # made only now: a run that fails leaves no empty folder behind
    out.mkdir(parents=True, exist_ok=True)
    psnr = [psnr_db(a, b) for a, b in zip(baseline, cat_images, strict=True)]
    name = policies.policy_label(config)
    saved = [
        _save_compare(out, prompts, seed, baseline, cat_images, settings, stats, source, psnr, name)
    ]
    if masks:
        saved += _save_token_maps(out, masks, pruned_steps, cat_images, steps, stats, source, name)
    if clusters:
        saved.append(_save_clusters(out, clusters[0], cat_images, config, source))

    summary: dict[str, Any] = {
        "catpatch_version": __version__,
        "pipeline": source,
        "prompts": prompts,
        "seeds": [seed + i for i in range(len(prompts))],
        "call": {k: v for k, v in call.items() if isinstance(v, (int, float, str))},
        "selection": None if config.budgeted else config.selection,
        "policy": name,
        "config": {f.name: _plain(getattr(config, f.name)) for f in fields(config)},
        "macs": config.macs,  # the budget (--macs), None without one
        "computed_steps": stats.plan.describe() if stats.plan is not None else None,
        "macs_ratio": round(stats.macs_ratio, 4),
        "image_tokens_computed": round(stats.computed_fraction, 4),
        "max_abs_pixel_difference": float(np.abs(baseline - cat_images).max()),
        "psnr_db": [None if p == float("inf") else round(p, 2) for p in psnr],
        "files": saved,
        "stats": {
            k: v for k, v in asdict(stats).items() if k not in ("config", "per_step", "plan")
        },
    }
    if timing is not None:
        summary["timing"] = {
            "warm_runs": timing.runs,
            "unpatched_s": [round(t, 4) for t in timing.unpatched_s],
            "patched_s": [round(t, 4) for t in timing.patched_s],
            "median_unpatched_s": round(timing.unpatched, 4),
            "median_patched_s": round(timing.patched, 4),
            "speedup": round(timing.speedup, 3),
            "bound": round(timing.bound, 3),
            "plausible": timing.plausible,
            "remeasured": timing.remeasured,
            "load_average_before": None if load is None else round(load, 2),
            "busy": busy_note(load),
            "how": TIMING_NOTE,
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary | {"summary_text": stats.summary()}


def _plain(value: Any) -> Any:
    """A config field as JSON holds it (a calibration file's path as text)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def psnr_db(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB of `image` against `reference`, pixels in [0, 1]; inf if they are equal."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(image, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _tile_scale(side: int, target: int) -> int:
    return max(1, target // side)


def _save_compare(
    out, prompts, seed, baseline, cat_images, settings, stats, source, psnr, name: str
) -> str:
    factor = _tile_scale(baseline.shape[1], 256)
    tiles = []
    for a, b in zip(baseline, cat_images, strict=True):
        diff = np.clip(np.abs(a - b) * 4, 0, 1)
        tiles.append([upscale(to_uint8(x), factor) for x in (a, b, diff)])
    Figure(
        tiles,
        title=f"Unpatched vs {name} ({settings})",
        columns=["unpatched", name, "|difference| x4 (black: equal)"],
        rows=[
            f'{i + 1}. "{p}" (seed {seed + i}; {name} vs unpatched: PSNR {db:.1f} dB)'
            for i, (p, db) in enumerate(zip(prompts, psnr, strict=True))
        ],
        caption=f"{name} computed {stats.computed_fraction:.1%} of the image tokens over the run; "
        f"MACs {stats.macs_ratio:.3f} of the unpatched run. {source}",
    ).save(out / "compare.png")
    return "compare.png"


def _token_tile(image: np.ndarray, mask: np.ndarray, factor: int) -> np.ndarray:
    """Recomputed tokens at full colour with a two-tone outline; the others dimmed."""
    cell = image.shape[0] // mask.shape[0] * factor
    big = upscale(to_uint8(image), factor)
    keep = upscale(mask, cell)[..., None]
    dimmed = (big * 0.3 + 40).astype(np.uint8)
    return outline_cells(np.where(keep, big, dimmed), mask, cell)


def _legend_tokens(cell: int = 14) -> list[Swatch]:
    grey = np.full((cell, cell, 3), 150, dtype=np.uint8)
    mask = np.ones((1, 1), dtype=bool)
    return [
        Swatch(outline_cells(grey, mask, cell), "recomputed at this step (full colour, outlined)"),
        Swatch((grey * 0.3 + 40).astype(np.uint8), "reused from the cache (dimmed)"),
    ]


def _save_token_maps(
    out, masks, pruned_steps, images, steps, stats, source, name: str
) -> list[str]:
    """tokens.png (one row per prompt, one column per pruned step) and tokens.gif (all
    prompts, one frame per pruned step)."""
    side, grid = images.shape[1], masks[0].shape[1]
    small = _tile_scale(side, 128)  # tokens.png: 128-px tiles, 10 steps side by side
    rows = [
        [_token_tile(images[g], mask[g], small) for mask in masks] for g in range(masks[0].shape[0])
    ]
    budget, tokens = stats.budget, stats.tokens
    explain = (
        f"Each pruned step recomputes {budget} of the {tokens} image tokens ({grid}x{grid} grid) "
        f"and reuses cached values for the rest; steps 1-{steps - len(masks)} are full warm-up "
        f"steps (steps counted from 1). {source}"
    )
    Figure(
        rows,
        title=f"Tokens {name} recomputed at each pruned step (columns: denoising step)",
        columns=[str(s) for s in pruned_steps],
        row_labels=[f"{g + 1}." for g in range(len(rows))],
        legend=_legend_tokens(),
        caption=explain + " Rows: the prompts of compare.png.",
        gap=3,
        wrap_columns=10,
    ).save(out / "tokens.png")

    big = _tile_scale(side, 192)
    frames = []
    for step, mask in zip(pruned_steps, masks, strict=True):
        tiles = [[_token_tile(images[g], mask[g], big) for g in range(mask.shape[0])]]
        figure = Figure(
            tiles,
            title=f"Step {step} of {steps}: {budget} of {tokens} image tokens recomputed",
            columns=[f"prompt {g + 1}" for g in range(mask.shape[0])],
            legend=_legend_tokens(),
            caption=explain,
        )
        frames.append(figure.render().convert("P", palette=1, colors=255))  # adaptive palette
    frames[0].save(
        out / "tokens.gif", save_all=True, append_images=frames[1:], duration=400, loop=0
    )
    return ["tokens.png", "tokens.gif"]


def _save_clusters(out, labels: np.ndarray, images: np.ndarray, config, source) -> str:
    count = int(labels.max()) + 1
    palette = _palette(count)
    side = images.shape[1]
    factor = _tile_scale(side, 256)
    cell = side // labels.shape[1] * factor
    tiles = []
    for g, image in enumerate(images[: labels.shape[0]]):
        colour = upscale(palette[labels[g]], cell)
        tile = to_uint8(upscale(image, factor) * 0.3 + colour * 0.7)
        tile[region_borders(labels[g], cell)] = 0
        tiles.append(number_regions(tile, labels[g], cell))
    legend = [
        Swatch(np.full((14, 14, 3), to_uint8(palette[c]), dtype=np.uint8), f"cluster {c + 1}")
        for c in range(count)
    ]
    Figure(
        [tiles],
        title=f"The {count} spatial clusters CAT made for each image",
        columns=[f"prompt {g + 1}" for g in range(len(tiles))],
        legend=legend,
        caption=f"Made once per image at step {config.warmup_steps}, the last full step "
        f"(steps counted from 1, as in tokens.png; k-means on each "
        f"token's position and model output; black lines: cluster borders; numbers: the "
        f"legend's clusters). Each pruned step "
        f"spreads part of its budget over these regions instead of piling it into one spot. "
        f"Colours tell clusters apart; they mean nothing across images. {source}",
    ).save(out / "clusters.png")
    return "clusters.png"
