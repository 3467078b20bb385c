"""`catpatch demo`: CAT on the embedded offline pipeline, with pictures of what it did.

Generates the same prompts with and without CAT and writes:
- `compare.png`: one row per prompt: unpatched | CAT | |difference| (x4);
- `tokens.png` / `tokens.gif`: which image tokens were recomputed at each pruned step;
- `clusters.png`: the spatial clusters CAT made (over the CAT image);
- `summary.json`: the savings (MACs, tokens, time of this run) and `cat_stats`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import CATConfig
from ..patching import apply_cat, get_patch, remove_cat
from ..schedule import Mode

DEMO_PROMPTS = (
    "a large red circle at the top left on a striped blue background",
    "a small yellow triangle at the bottom right on a dotted green background",
    "a medium white square at the center on a checkered purple background",
    "a large green cross at the top right on a plain gray background",
)


def default_pipeline(device: str | None = None) -> tuple[Any, dict[str, Any], str]:
    """The embedded offline default: the trained toy pipeline shipped in the package (see
    `catpatch.toy`), or a tiny untrained one when those weights are absent.

    Returns (pipeline, recommended call kwargs, description).
    """
    try:
        from .. import toy

        pipe = toy.load_pipeline(device=device)
        return pipe, dict(toy.CALL_KWARGS), "toy SD3 pipeline trained by catpatch.toy (offline)"
    except (ImportError, OSError, ValueError):
        from ..models.tiny import build_pipeline

        pipe = build_pipeline("tiny-sd3")
        pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(device)
        kwargs = dict(height=128, width=128, num_inference_steps=28, guidance_scale=5.0)
        return pipe, kwargs, "tiny untrained SD3 pipeline built from configs (offline)"


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def _palette(count: int) -> np.ndarray:
    """`count` distinct colours (golden-angle hues)."""
    import colorsys

    hues = (np.arange(count) * 0.618033988749895) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.65, 0.95) for h in hues]) * 255


def run_demo(
    out: str | Path,
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    config: CATConfig | None = None,
    seed: int = 0,
    device: str | None = None,
    **call_overrides: Any,
) -> dict[str, Any]:
    """Run the demo into folder `out`; returns the summary that is also saved as JSON."""
    from PIL import Image

    from .. import cat_stats

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe, call, source = default_pipeline(device)
    call.update(call_overrides)
    config = config or CATConfig()
    prompts = list(prompts)

    def generate(callback=None) -> tuple[np.ndarray, float]:
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        images = pipe(
            prompt=prompts, generator=generator, output_type="np",
            callback_on_step_end=callback, **call,
        ).images  # fmt: skip
        return images, time.perf_counter() - start

    baseline, _ = generate()  # also the warm-up of the unpatched path
    apply_cat(pipe, config)
    state = get_patch(pipe).state
    masks: list[np.ndarray] = []
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
        return kwargs

    cat_images, _ = generate(record)  # the pictures; also the warm-up of the CAT path
    stats = cat_stats(pipe)
    # One timed run each, after both warm-ups (a demo, not a benchmark: see catpatch bench).
    _, cat_s = generate()
    remove_cat(pipe)
    _, baseline_s = generate()

    # compare.png: unpatched | CAT | |diff| x4, one row per prompt, upscaled for viewing
    factor = max(1, 256 // baseline.shape[1])
    rows = []
    for a, b in zip(baseline, cat_images, strict=True):
        diff = np.clip(np.abs(a - b) * 4, 0, 1)
        rows.append(np.concatenate([a, b, diff], axis=1))
    grid = _upscale(_to_uint8(np.concatenate(rows, axis=0)), factor)
    Image.fromarray(grid).save(out / "compare.png")

    saved = ["compare.png"]
    if masks:
        saved += _save_token_maps(out, masks, cat_images, factor)
    if clusters:
        saved.append(_save_clusters(out, clusters[0], cat_images, factor))

    summary = {
        "pipeline": source,
        "prompts": prompts,
        "call": {k: v for k, v in call.items() if isinstance(v, (int, float, str))},
        "config": repr(config),
        "time_unpatched_s": round(baseline_s, 3),
        "time_cat_s": round(cat_s, 3),
        "speedup_this_run": round(baseline_s / cat_s, 3),
        "macs_ratio": round(stats.macs_ratio, 4),
        "image_tokens_computed": round(stats.computed_fraction, 4),
        "max_abs_pixel_difference": float(np.abs(baseline - cat_images).max()),
        "files": saved,
        "stats": {k: v for k, v in asdict(stats).items() if k not in ("config", "per_step")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary | {"summary_text": stats.summary()}


def _save_token_maps(out: Path, masks, images: np.ndarray, factor: int) -> list[str]:
    """tokens.png (one row per prompt, one column per pruned step: recomputed tokens in red)
    and tokens.gif (all prompts, one frame per pruned step)."""
    from PIL import Image

    side = images.shape[1]
    steps = []  # per pruned step: (prompts, side, side, 3)
    for mask in masks:  # (groups, H', W')
        cell = side // mask.shape[1]
        up = np.stack([_upscale(m, cell) for m in mask])[..., None]
        shown = images[: mask.shape[0]]
        steps.append(np.where(up, shown * 0.35 + np.array([1.0, 0.15, 0.15]) * 0.65, shown * 0.5))
    per_prompt = zip(*steps, strict=True)
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in per_prompt], axis=0)
    Image.fromarray(_to_uint8(grid)).save(out / "tokens.png")
    frames = [
        Image.fromarray(_upscale(_to_uint8(np.concatenate(list(step), axis=1)), factor))
        for step in steps
    ]
    frames[0].save(
        out / "tokens.gif", save_all=True, append_images=frames[1:], duration=300, loop=0
    )
    return ["tokens.png", "tokens.gif"]


def _save_clusters(out: Path, labels: np.ndarray, images: np.ndarray, factor: int) -> str:
    from PIL import Image

    palette = _palette(int(labels.max()) + 1) / 255
    side = images.shape[1]
    tiles = []
    for g, image in enumerate(images[: labels.shape[0]]):
        colour = _upscale(palette[labels[g]], side // labels.shape[1])
        tiles.append(image * 0.45 + colour * 0.55)
    Image.fromarray(_upscale(_to_uint8(np.concatenate(tiles, axis=1)), factor)).save(
        out / "clusters.png"
    )
    return "clusters.png"
