"""Running the study: generating each configuration's images, scoring them against the
unpatched references, resuming from `rows.jsonl` (`run_study`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...patching import apply_cat, remove_cat
from ...peers.magcache import MagCache, apply_magcache, calibrate_magcache, remove_magcache
from ...peers.taylorseer import TaylorSeer, apply_taylorseer, remove_taylorseer
from ...trained import TrainedModel, trained_model
from ..common import CommandError
from .methods import MAGCACHE_CALIBRATION_IMAGES, MODEL, Setting, configurations
from .rows import Row, append_row, load_done
from .tables import write_outputs


def generate_images(
    pipe, prompts, steps: int, batch_size: int = 16, model: TrainedModel | None = None
) -> tuple[Tensor, np.ndarray]:
    """Final latents and decoded images (N, H, W, 3) in [0, 1] for the evaluation prompts of
    `model` (the toy unless given)."""
    from ... import toy

    model = model or toy.MODEL
    latents = model.generate(
        pipe, prompts, batch_size, output_type="latent", num_inference_steps=steps
    )
    vae = pipe.vae
    with torch.no_grad():
        scaled = latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = torch.cat([vae.decode(z, return_dict=False)[0] for z in scaled.split(16)])
    images = pipe.image_processor.postprocess(decoded, output_type="np")
    return latents, images


def fidelity(images: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of `images` against `reference`, both (N, H, W, 3)."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    a = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    b = torch.from_numpy(reference).permute(0, 3, 1, 2).double()
    psnr = torch.stack([
        peak_signal_noise_ratio(x[None], y[None], data_range=1.0) for x, y in zip(a, b, strict=True)
    ])  # fmt: skip
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    return psnr.numpy(), ssim.numpy()


def check_model(model: str) -> tuple[TrainedModel, Path | None]:
    """The trained model and folder of `--model`; CommandError unless it is a built-in name
    (`toy`, `scenes`) or a folder written by `python -m catpatch.toy train` / `python -m
    catpatch.scenes train` (a pipeline and its detector)."""
    from ...trained.detector import DETECTOR_FILE

    trained, folder = trained_model(model)
    if folder is None:
        return trained, None
    if not (folder / "model_index.json").is_file() or not (folder / DETECTOR_FILE).is_file():
        raise CommandError(
            f"--model {model}: the study needs 'toy', 'scenes' or a folder written by `python "
            f"-m catpatch.toy train --out DIR` (model_index.json and {DETECTOR_FILE})"
        )
    return trained, folder


def run_study(
    out: str | Path,
    images: int = 64,
    quick: bool = False,
    batch_size: int = 16,
    runs: list[tuple[int, str, Setting]] | None = None,
    log=print,
    model: str = "toy",
    progress: bool = False,
    report: bool = False,
    extra: list[tuple[int, str, Setting]] | None = None,
) -> list[Row]:
    """Run the study into folder `out` (see `catpatch.cli.study`); returns its rows.

    `runs` replaces the configurations of the study (`configurations(quick)`). `model`: `toy`
    or a folder written by `python -m catpatch.toy train`. `progress`: a bar over the
    configurations (log lines then print above it). `report`: run nothing, write the tables
    of the runs an interrupted study in `out` has finished. `extra`: runs added to those
    (`planned_runs`: `catpatch study --macs B`)."""
    from tqdm.auto import tqdm

    from ... import cat_stats
    from ...trained.detector import DETECTOR_FILE

    trained, folder = check_model(model)
    pipe = trained.load_pipeline(path=folder)
    detector = trained.load_detector(folder / DETECTOR_FILE if folder else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = trained.eval_prompts(images)
    labels = np.array([p.labels for p in prompts])
    runs = configurations(quick) if runs is None else runs
    runs = [*runs, *(extra or [])]
    joint = "+".join(trained.data.JOINT[0])  # the detector's pair: colour+position on the toy

    def accuracy(imgs: np.ndarray) -> dict[str, float]:
        acc = trained.score(detector, imgs, labels)
        return {**acc, "joint": acc[joint]}

    # Each finished run is appended to `rows.jsonl` and each reference saved, so a run of the
    # study that was killed resumes where it stopped (same images count, same configurations).
    done = load_done(out / "rows.jsonl", images)
    references: dict[int, tuple[Tensor, np.ndarray]] = {}
    rows: list[Row] = []
    step_counts = sorted({s for s, _, _ in runs})
    if report:  # only step counts whose references an earlier run generated
        step_counts = [s for s in step_counts if _reference_path(out, images, s).exists()]
        runs = [r for r in runs if r[0] in step_counts and _key(*r) in done]
        if not runs:
            raise CommandError(
                f"{out}: no finished runs of a {images}-image study to report; run `catpatch "
                f"study --out {out}` without --report first"
            )
        log(f"{len(runs)} of {len(configurations(quick)) + len(extra or [])} runs finished")
    bar = tqdm(total=len(step_counts) + len(runs), desc="study", unit="run", disable=not progress)
    if progress:
        log = tqdm.write
    try:
        for steps in step_counts:
            start = time.perf_counter()
            references[steps] = _reference(
                out,
                images,
                steps,
                lambda s=steps: generate_images(pipe, prompts, s, batch_size, trained),
            )
            acc = accuracy(references[steps][1])
            rows.append(
                Row(
                    steps, "unpatched", "", 1.0, steps, 0, 1.0, float("inf"), float("inf"),
                    1.0, 0.0, acc["joint"], acc["all"], time.perf_counter() - start,
                )
            )  # fmt: skip
            log(f"unpatched {steps} steps: done")
            bar.update(1)
        unpatched_macs: dict[int, int] = {}
        ratios: dict[int, list[float]] = {}  # MagCache's, per step count
        for steps, method, config in runs:
            key = _key(steps, method, config)
            if key in done:
                rows.append(done[key])
                bar.update(1)
                continue
            start = time.perf_counter()
            if isinstance(config, TaylorSeer):
                latents, imgs, macs = _run_peer(
                    pipe, prompts, steps, batch_size, unpatched_macs, trained,
                    lambda c=config: apply_taylorseer(pipe, c), lambda: remove_taylorseer(pipe),
                )  # fmt: skip
                keep, t0, clusters = 1.0, config.warmup_steps, 0
            elif isinstance(config, MagCache):
                if steps not in ratios:  # calibrated on captions the study does not score
                    held_out = trained.eval_prompts(len(prompts) + MAGCACHE_CALIBRATION_IMAGES)
                    ratios[steps] = _calibrate(pipe, held_out[len(prompts) :], steps, trained)
                calibrated = dataclasses.replace(config, mag_ratios=ratios[steps])
                latents, imgs, macs = _run_peer(
                    pipe, prompts, steps, batch_size, unpatched_macs, trained,
                    lambda c=calibrated: apply_magcache(pipe, c), lambda: remove_magcache(pipe),
                )  # fmt: skip
                keep, t0 = 1.0, round(config.retention_ratio * steps)
                clusters = 0
            else:
                apply_cat(pipe, config)
                latents, imgs = generate_images(pipe, prompts, steps, batch_size, trained)
                stats = cat_stats(pipe)
                macs = stats.macs_ratio
                remove_cat(pipe)
                keep, t0, clusters = config.keep_ratio, config.warmup_steps, config.num_clusters
                if config.budgeted:  # no α, t0 or clusters: the plan's leading computed steps
                    keep, t0, clusters = 1.0, _leading(stats.plan.computed), 0
            ref_latents, ref_images = references[steps]
            psnr, ssim = fidelity(imgs, ref_images)
            ref_norm = ref_latents.flatten(1).norm(dim=1)
            error = (latents - ref_latents).flatten(1).norm(dim=1) / ref_norm
            acc = accuracy(imgs)
            row = Row(
                steps, method, _describe(config), keep, t0, clusters, macs, float(psnr.mean()),
                float(psnr.min()), float(ssim.mean()), float(error.mean()),
                acc["joint"], acc["all"], time.perf_counter() - start,
                tuple(float(v) for v in psnr),
            )  # fmt: skip
            rows.append(row)
            append_row(out / "rows.jsonl", key, images, row)
            log(f"{steps} steps {method} {config!r}: PSNR {row.psnr:.2f} dB, MACs {macs:.3f}")
            bar.update(1)
    finally:
        bar.close()
    write_outputs(out, rows, images)
    return rows


def _run_peer(
    pipe, prompts, steps: int, batch_size: int, unpatched: dict[int, int],
    trained: TrainedModel, apply, remove,
) -> tuple[Tensor, np.ndarray, float]:  # fmt: skip
    """Latents, images and MACs ratio of one of diffusers' caches put on by `apply` and taken
    off by `remove` (MACs measured with torch's FLOP counter on one caption: the ratio does
    not depend on it)."""
    from ...stats import measured_macs

    def one() -> None:
        generate_images(pipe, prompts[:1], steps, model=trained)

    if steps not in unpatched:
        unpatched[steps] = measured_macs(one, MODEL)
    apply()
    try:
        latents, imgs = generate_images(pipe, prompts, steps, batch_size, trained)
        macs = measured_macs(one, MODEL) / unpatched[steps]
    finally:
        remove()
    return latents, imgs, macs


def _calibrate(pipe, prompts, steps: int, trained: TrainedModel) -> list[float]:
    """MagCache's magnitude ratios at `steps`, from one batch of `prompts` with their seeds."""
    import torch

    call = {k: v for k, v in trained.call_kwargs.items() if k != "num_inference_steps"}
    gens = [torch.Generator().manual_seed(p.seed) for p in prompts]
    return calibrate_magcache(pipe, [p.prompt for p in prompts], steps, generator=gens, **call)


def _describe(config: Setting) -> str:
    if isinstance(config, TaylorSeer):
        return f"interval {config.cache_interval}"
    if isinstance(config, MagCache):
        return f"threshold {config.threshold:g}"
    if config.budgeted:
        return f"MACs budget {config.macs:g}, forecast {config.forecast}"
    if config.selection == "cat+reuse":
        return f"MACs target {config.reuse_macs:g}"
    return ""


def _leading(computed: tuple[int, ...]) -> int:
    """How many steps a plan computes before its first forecast one."""
    count = 0
    while count in computed:
        count += 1
    return count


def _key(steps: int, method: str, config: Setting) -> str:
    """The run's record key: every field spelt out (not only those off their defaults), so
    a changed default never makes an old row answer for another configuration."""
    fields = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config))
    return f"{steps} {method} {type(config).__name__}({fields})"


def _reference(out: Path, images: int, steps: int, make) -> tuple[Tensor, np.ndarray]:
    """The unpatched latents and images for `steps`, generated once and kept in `out`."""
    path = _reference_path(out, images, steps)
    if path.exists():
        saved = torch.load(path)
        return saved["latents"], saved["images"].numpy()
    latents, imgs = make()
    torch.save({"latents": latents, "images": torch.from_numpy(imgs)}, path)
    return latents, imgs


def _reference_path(out: Path, images: int, steps: int) -> Path:
    return out / f"reference-{steps}-{images}.pt"
