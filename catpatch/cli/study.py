"""`catpatch study`: image quality under pruning, CAT against naive selection at equal MACs.

On the trained toy pipeline (`catpatch.toy`), a fixed set of captions and seeds is generated
unpatched and with every method, for 28 and 50 steps and keep ratios 0.2 / 0.3 / 0.5:

- `cat` (the default) and, at the same MACs, `random`, `noise` (drift only), `stale`
  (round robin) and `step` (step-level reuse: whole steps computed or skipped);
- warm-up t0 and the cluster count swept around the defaults (28 steps, α 0.3).

Fidelity to the unpatched output: PSNR and SSIM in pixel space (torchmetrics), the relative L2
error of the final latents; caption following: the toy detector's accuracy on the images
(colour and position of the shape both right, and all six attributes right). Writes
`study.csv`, `study.md` (a table), `study.png` (PSNR against MACs, one line per method) and
`study.json`. Finished runs are kept in `rows.jsonl` (and the unpatched references in
`reference-*.pt`), so rerunning into the same folder resumes an interrupted study; use a new
folder after changing the model or the code.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import CATConfig
from ..patching import apply_cat, remove_cat
from .common import CommandError

METHODS = ("cat", "random", "noise", "stale", "step")
STEPS = (28, 50)
KEEP_RATIOS = (0.2, 0.3, 0.5)
WARMUP_SWEEP = (4, 6, 10, 12)
CLUSTER_SWEEP = (5, 10, 40)


@dataclass
class Row:
    """One configuration of the study and what it measured."""

    steps: int
    method: str
    keep_ratio: float
    warmup_steps: int
    num_clusters: int
    macs_ratio: float
    psnr: float  # dB, mean over images, against the unpatched images of the same steps
    psnr_min: float
    ssim: float
    latent_error: float  # ||z - z_ref|| / ||z_ref|| of the final latents, mean
    accuracy_colour_position: float  # detector: colour and position both right
    accuracy_all: float  # detector: all attributes right
    seconds: float


def _generate(pipe, prompts, steps: int, batch_size: int) -> tuple[Tensor, np.ndarray]:
    """Final latents and decoded images (N, H, W, 3) in [0, 1] for the evaluation prompts."""
    from .. import toy

    latents = toy.generate(
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


def configurations(quick: bool = False) -> list[tuple[int, str, CATConfig]]:
    """(steps, method, config) of every run of the study; `quick` keeps a small subset."""
    runs = []
    steps_list = STEPS[:1] if quick else STEPS
    keeps = KEEP_RATIOS[1:2] if quick else KEEP_RATIOS
    for steps in steps_list:
        for keep in keeps:
            for method in METHODS:
                runs.append((steps, method, CATConfig(keep_ratio=keep, selection=method)))
    if not quick:
        for t0 in WARMUP_SWEEP:
            runs.append((28, "cat", CATConfig(warmup_steps=t0)))
        for clusters in CLUSTER_SWEEP:
            runs.append((28, "cat", CATConfig(num_clusters=clusters)))
    return runs


def check_model(model: str) -> None:
    """CommandError unless `model` is `toy` or a folder written by `python -m catpatch.toy
    train` (a pipeline and its detector)."""
    if model == "toy":
        return
    from ..toy.detector import DETECTOR_FILE

    folder = Path(model).expanduser()
    if not (folder / "model_index.json").is_file() or not (folder / DETECTOR_FILE).is_file():
        raise CommandError(
            f"--model {model}: the study needs 'toy' or a folder written by `python -m "
            f"catpatch.toy train --out DIR` (model_index.json and {DETECTOR_FILE})"
        )


def run_study(
    out: str | Path,
    images: int = 64,
    quick: bool = False,
    batch_size: int = 16,
    runs: list[tuple[int, str, CATConfig]] | None = None,
    log=print,
    model: str = "toy",
    progress: bool = False,
) -> list[Row]:
    """Run the study into folder `out` (see the module docstring); returns its rows.

    `runs` replaces the configurations of the study (`configurations(quick)`). `model`: `toy`
    or a folder written by `python -m catpatch.toy train`. `progress`: a bar over the
    configurations (log lines then print above it)."""
    from tqdm.auto import tqdm

    from .. import cat_stats, toy
    from ..toy.detector import DETECTOR_FILE

    check_model(model)
    folder = None if model == "toy" else Path(model).expanduser()
    pipe = toy.load_pipeline(path=folder)
    detector = toy.load_detector(folder / DETECTOR_FILE if folder else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = toy.eval_prompts(images)
    labels = np.array([p.labels for p in prompts])
    runs = configurations(quick) if runs is None else runs

    def accuracy(imgs: np.ndarray) -> dict[str, float]:
        from ..toy.detector import accuracy as score

        return score(detector.predict(imgs), labels)

    # Each finished run is appended to `rows.jsonl` and each reference saved, so a run of the
    # study that was killed resumes where it stopped (same images count, same configurations).
    done = _load_done(out / "rows.jsonl", images)
    references: dict[int, tuple[Tensor, np.ndarray]] = {}
    rows: list[Row] = []
    step_counts = sorted({s for s, _, _ in runs})
    bar = tqdm(total=len(step_counts) + len(runs), desc="study", unit="run", disable=not progress)
    if progress:
        log = tqdm.write
    try:
        for steps in step_counts:
            start = time.perf_counter()
            references[steps] = _reference(
                out, images, steps, lambda s=steps: _generate(pipe, prompts, s, batch_size)
            )
            acc = accuracy(references[steps][1])
            rows.append(
                Row(
                    steps, "unpatched", 1.0, steps, 0, 1.0, float("inf"), float("inf"), 1.0,
                    0.0, acc["colour+position"], acc["all"], time.perf_counter() - start,
                )
            )  # fmt: skip
            log(f"unpatched {steps} steps: done")
            bar.update(1)
        for steps, method, config in runs:
            key = _key(steps, config)
            if key in done:
                rows.append(done[key])
                bar.update(1)
                continue
            start = time.perf_counter()
            apply_cat(pipe, config)
            latents, imgs = _generate(pipe, prompts, steps, batch_size)
            stats = cat_stats(pipe)
            remove_cat(pipe)
            ref_latents, ref_images = references[steps]
            psnr, ssim = fidelity(imgs, ref_images)
            ref_norm = ref_latents.flatten(1).norm(dim=1)
            error = (latents - ref_latents).flatten(1).norm(dim=1) / ref_norm
            acc = accuracy(imgs)
            row = Row(
                steps, method, config.keep_ratio, config.warmup_steps, config.num_clusters,
                stats.macs_ratio, float(psnr.mean()), float(psnr.min()), float(ssim.mean()),
                float(error.mean()), acc["colour+position"], acc["all"],
                time.perf_counter() - start,
            )  # fmt: skip
            rows.append(row)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps({"key": key, "images": images, **asdict(row)}) + "\n")
            log(f"{steps} steps {config!r}: PSNR {row.psnr:.2f} dB, MACs {row.macs_ratio:.3f}")
            bar.update(1)
    finally:
        bar.close()
    write_outputs(out, rows, images)
    return rows


def _key(steps: int, config: CATConfig) -> str:
    return f"{steps} {config!r}"


def _load_done(path: Path, images: int) -> dict[str, Row]:
    """Rows of an earlier, interrupted study in the same folder with the same image count."""
    if not path.exists():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        key = record.pop("key")
        if record.pop("images") == images:
            done[key] = Row(**record)
    return done


def _reference(out: Path, images: int, steps: int, make) -> tuple[Tensor, np.ndarray]:
    """The unpatched latents and images for `steps`, generated once and kept in `out`."""
    path = out / f"reference-{steps}-{images}.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["latents"], saved["images"].numpy()
    latents, imgs = make()
    torch.save({"latents": latents, "images": torch.from_numpy(imgs)}, path)
    return latents, imgs


def write_outputs(out: Path, rows: list[Row], images: int) -> None:
    fields = list(asdict(rows[0]))
    with open(out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    (out / "study.md").write_text(markdown_table(rows, images))
    (out / "study.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    plot(rows, out / "study.png")


def markdown_table(rows: list[Row], images: int) -> str:
    head = (
        f"| steps | method | α | t0 | C | MACs | PSNR dB (min) | SSIM | latent err | "
        f"acc colour+pos | acc all |\n|{'---|' * 11}\n"
    )
    lines = []
    for r in rows:
        psnr = "∞" if r.method == "unpatched" else f"{r.psnr:.2f} ({r.psnr_min:.1f})"
        lines.append(
            f"| {r.steps} | {r.method} | {r.keep_ratio:g} | {r.warmup_steps} | "
            f"{r.num_clusters or '-'} | {r.macs_ratio:.3f} | {psnr} | {r.ssim:.4f} | "
            f"{r.latent_error:.4f} | {r.accuracy_colour_position:.3f} | {r.accuracy_all:.3f} |"
        )
    return f"{images} images per configuration.\n\n" + head + "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    """PSNR against MACs ratio, one line per method, one panel per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({r.steps for r in rows})
    fig, axes = plt.subplots(1, len(steps_list), figsize=(5.5 * len(steps_list), 4), squeeze=False)
    for ax, steps in zip(axes[0], steps_list, strict=True):
        for method in METHODS:
            points = sorted(
                (r.macs_ratio, r.psnr)
                for r in rows
                if r.steps == steps and r.method == method and _default_sweep(r)
            )
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, marker="o", label=method)
        ax.set_title(f"{steps} steps (t0 8, 20 clusters)")
        ax.set_xlabel("MACs / unpatched")
        ax.set_ylabel("PSNR vs unpatched (dB)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without the default t0 / clusters has none
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _default_sweep(row: Row) -> bool:
    defaults = CATConfig()
    return row.warmup_steps == defaults.warmup_steps and (row.num_clusters == defaults.num_clusters)
