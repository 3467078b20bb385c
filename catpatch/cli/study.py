"""`catpatch study`: image quality under pruning, CAT against naive selection at equal MACs.

On the trained toy pipeline (`catpatch.toy`), a fixed set of captions and seeds is generated
unpatched and with every method, for 28 and 50 steps and keep ratios 0.2 / 0.3 / 0.5:

- token policies at the same MACs: `cat` (the default), `paper` (the reference's rules),
  each also with the first-order token forecast (`+forecast`, `token_order=1`), and the
  ablations `random`, `noise` (drift only), `stale` (round robin);
- whole-step peers: `step` (step-level reuse at CAT's MACs) and `step+forecast` (skipped
  steps forecast, `reuse_order=1`), also at α 0.05 / 0.1 to cover low MACs; `cat+reuse` (CAT
  combined with step reuse at MACs 0.4 / 0.5 / 0.6, zeroth and first order); diffusers'
  `taylorseer` (attention forecast) and `taylorseer-lite` (whole steps forecast) at cache
  intervals 2-4, MACs measured with torch's FLOP counter (`catpatch.taylorseer`);
- warm-up t0 and the cluster count swept around the defaults (28 steps, α 0.3).

Fidelity to the unpatched output: PSNR and SSIM in pixel space (torchmetrics), the relative L2
error of the final latents; caption following: the toy detector's accuracy on the images
(colour and position of the shape both right, and all six attributes right). Writes
`study.csv`, `study.md` (a table), `study.png` (PSNR against MACs, one line per method) and
`study.json`, and `targets.md` (the comparisons at equal MACs), each naming the catpatch
version. Finished runs are kept in `rows.jsonl` (and the unpatched references in
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

from .. import __version__
from ..config import CATConfig
from ..patching import apply_cat, remove_cat
from ..taylorseer import TaylorSeer, apply_taylorseer, remove_taylorseer
from .common import CommandError, plural

# Token policies: run at every keep ratio, all at the same MACs.
TOKEN_METHODS: dict[str, dict] = {
    "cat": {},
    "cat+forecast": dict(token_order=1),
    "paper": dict(selection="paper"),
    "paper+forecast": dict(selection="paper", token_order=1),
    "random": dict(selection="random"),
    "noise": dict(selection="noise"),
    "stale": dict(selection="stale"),
}
STEP_METHODS: dict[str, dict] = {
    "step": dict(selection="step"),
    "step+forecast": dict(selection="step", reuse_order=1),
}
COMBINED_METHODS: dict[str, dict] = {
    "cat+reuse": dict(selection="cat+reuse"),
    "cat+reuse+forecast": dict(selection="cat+reuse", reuse_order=1, token_order=1),
}
QUICK_METHODS = ("cat", "random", "noise", "stale", "step")
METHODS = (*TOKEN_METHODS, *STEP_METHODS, *COMBINED_METHODS, "taylorseer", "taylorseer-lite")
CATPATCH_METHODS = (*TOKEN_METHODS, *STEP_METHODS, *COMBINED_METHODS)
STEPS = (28, 50)
KEEP_RATIOS = (0.2, 0.3, 0.5)
LOW_STEP_KEEP_RATIOS = (0.05, 0.1)  # step reuse below CAT's MACs, for the combined policy
REUSE_MACS = (0.4, 0.5, 0.6)
TAYLORSEER_INTERVALS = (2, 3, 4)
WARMUP_SWEEP = (4, 6, 10, 12)
CLUSTER_SWEEP = (5, 10, 40)
MODEL = "SD3Transformer2DModel"  # whose MACs are counted

Setting = CATConfig | TaylorSeer


@dataclass
class Row:
    """One configuration of the study and what it measured."""

    steps: int
    method: str
    setting: str  # what sets the MACs when α does not: the combined target, the interval
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
    psnr_each: tuple[float, ...] = ()  # per image, for paired comparisons (rows.jsonl only)

    def table(self) -> dict:
        """The fields written to study.csv / study.json."""
        return {k: v for k, v in asdict(self).items() if k != "psnr_each"}


def _generate(pipe, prompts, steps: int, batch_size: int = 16) -> tuple[Tensor, np.ndarray]:
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


def configurations(quick: bool = False) -> list[tuple[int, str, Setting]]:
    """(steps, method, settings) of every run of the study; `quick` keeps a small subset
    (28 steps, α 0.3, the token ablations and step reuse)."""
    if quick:
        methods = {**TOKEN_METHODS, **STEP_METHODS}
        return [(28, m, CATConfig(keep_ratio=0.3, **methods[m])) for m in QUICK_METHODS]
    runs: list[tuple[int, str, Setting]] = []
    for steps in STEPS:
        for keep in KEEP_RATIOS:
            for method, fields in {**TOKEN_METHODS, **STEP_METHODS}.items():
                runs.append((steps, method, CATConfig(keep_ratio=keep, **fields)))
        for keep in LOW_STEP_KEEP_RATIOS:
            for method, fields in STEP_METHODS.items():
                runs.append((steps, method, CATConfig(keep_ratio=keep, **fields)))
        for macs in REUSE_MACS:
            for method, fields in COMBINED_METHODS.items():
                runs.append((steps, method, CATConfig(reuse_macs=macs, **fields)))
        for interval in TAYLORSEER_INTERVALS:
            for lite in (False, True):
                method = "taylorseer-lite" if lite else "taylorseer"
                runs.append((steps, method, TaylorSeer(cache_interval=interval, lite=lite)))
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
    runs: list[tuple[int, str, Setting]] | None = None,
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
                    steps, "unpatched", "", 1.0, steps, 0, 1.0, float("inf"), float("inf"),
                    1.0, 0.0, acc["colour+position"], acc["all"], time.perf_counter() - start,
                )
            )  # fmt: skip
            log(f"unpatched {steps} steps: done")
            bar.update(1)
        unpatched_macs: dict[int, int] = {}
        for steps, method, config in runs:
            key = _key(steps, config)
            if key in done:
                rows.append(done[key])
                bar.update(1)
                continue
            start = time.perf_counter()
            if isinstance(config, TaylorSeer):
                latents, imgs, macs = _run_taylorseer(
                    pipe, prompts, steps, batch_size, config, unpatched_macs
                )
                keep, t0, clusters = 1.0, config.warmup_steps, 0
            else:
                apply_cat(pipe, config)
                latents, imgs = _generate(pipe, prompts, steps, batch_size)
                macs = cat_stats(pipe).macs_ratio
                remove_cat(pipe)
                keep, t0, clusters = config.keep_ratio, config.warmup_steps, config.num_clusters
            ref_latents, ref_images = references[steps]
            psnr, ssim = fidelity(imgs, ref_images)
            ref_norm = ref_latents.flatten(1).norm(dim=1)
            error = (latents - ref_latents).flatten(1).norm(dim=1) / ref_norm
            acc = accuracy(imgs)
            row = Row(
                steps, method, _describe(config), keep, t0, clusters, macs, float(psnr.mean()),
                float(psnr.min()), float(ssim.mean()), float(error.mean()),
                acc["colour+position"], acc["all"], time.perf_counter() - start,
                tuple(float(v) for v in psnr),
            )  # fmt: skip
            rows.append(row)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps({"key": key, "images": images, **asdict(row)}) + "\n")
            log(f"{steps} steps {method} {config!r}: PSNR {row.psnr:.2f} dB, MACs {macs:.3f}")
            bar.update(1)
    finally:
        bar.close()
    write_outputs(out, rows, images)
    return rows


def _run_taylorseer(
    pipe, prompts, steps: int, batch_size: int, settings: TaylorSeer, unpatched: dict[int, int]
) -> tuple[Tensor, np.ndarray, float]:
    """Latents, images and MACs ratio of diffusers' TaylorSeerCache (MACs measured on one
    caption: the ratio does not depend on it)."""
    from ..stats import measured_macs

    def one() -> None:
        _generate(pipe, prompts[:1], steps)

    if steps not in unpatched:
        unpatched[steps] = measured_macs(one, MODEL)
    apply_taylorseer(pipe, settings)
    try:
        latents, imgs = _generate(pipe, prompts, steps, batch_size)
        macs = measured_macs(one, MODEL) / unpatched[steps]
    finally:
        remove_taylorseer(pipe)
    return latents, imgs, macs


def _describe(config: Setting) -> str:
    if isinstance(config, TaylorSeer):
        return f"interval {config.cache_interval}"
    if config.selection == "cat+reuse":
        return f"MACs target {config.reuse_macs:g}"
    return ""


def _key(steps: int, config: Setting) -> str:
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
    fields = list(rows[0].table())
    with open(out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r.table() for r in rows)
    (out / "study.md").write_text(markdown_table(rows, images))
    table = [{**r.table(), "catpatch_version": __version__} for r in rows]
    (out / "study.json").write_text(json.dumps(table, indent=1))
    (out / "targets.md").write_text(targets(rows))
    plot(rows, out / "study.png")


def _paired(a: Row, b: Row) -> tuple[float, float]:
    """Mean PSNR difference a − b over the same images and its standard error."""
    d = np.asarray(a.psnr_each) - np.asarray(b.psnr_each)
    finite = d[np.isfinite(d)]
    if finite.size < 2:
        return float(a.psnr - b.psnr), float("nan")
    return float(finite.mean()), float(finite.std(ddof=1) / np.sqrt(finite.size))


def _difference(a: Row, b: Row) -> str:
    mean, se = _paired(a, b)
    return f"{mean:+.2f} ± {se:.2f}"


def _interpolate(rows: list[Row], macs: float) -> float | None:
    """PSNR of a method's curve at `macs` (linear between its runs; None outside them)."""
    points = sorted((r.macs_ratio, r.psnr) for r in rows)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= macs <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (macs - x0) / (x1 - x0)
    return None


def targets(rows: list[Row]) -> str:
    """The study's comparisons as markdown: each catpatch method against its peers at equal
    MACs, with paired standard errors where the MACs are the same. A comparison whose methods
    the study did not run (`--quick`) says so in one line instead of an empty table."""
    default = "cat" if CATConfig().token_order == 0 else "cat+forecast"
    if CATConfig().selection == "paper":
        default = default.replace("cat", "paper")
    main = [r for r in rows if not _in_sweep(r) and r.method != "unpatched"]
    out = [
        f"catpatch {__version__}. Default token policy: `{default}`. Differences in dB PSNR "
        f"± standard error.\n"
    ]

    def find(steps, method, keep=None):
        found = [r for r in main if r.steps == steps and r.method == method]
        return next((r for r in found if keep is None or r.keep_ratio == keep), None)

    def table(title: str, header: list[str], lines: list[str], missing: str) -> None:
        out.append(f"\n{title}\n")
        if not lines:
            out.append(f"Not in this study: {missing}.")
            return
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out.extend(lines)

    lines = []
    for steps in sorted({r.steps for r in main}):
        for keep in KEEP_RATIOS:
            base = find(steps, default, keep)
            if base is None:
                continue
            cells = []
            for peer in ("random", "noise", "stale"):
                other = find(steps, peer, keep)
                cells.append("-" if other is None else _difference(base, other))
            zeroth = find(steps, default.replace("+forecast", ""), keep)
            forecast = find(steps, default.split("+")[0] + "+forecast", keep)
            gain = "-" if not (zeroth and forecast) else _difference(forecast, zeroth)
            lines.append(
                f"| {steps} | {keep:g} | {base.macs_ratio:.3f} | "
                + " | ".join(cells)
                + f" | {gain} |"
            )
    table(
        "The default token policy against the ablations at the same MACs:",
        ["steps", "α", "MACs", "default − random", "− noise", "− stale", "forecast gain"],
        lines,
        f"no `{default}` run",
    )
    lines = []
    for r in (r for r in main if r.method in COMBINED_METHODS):
        curves = [[s for s in main if s.steps == r.steps and s.method == m] for m in STEP_METHODS]
        peers = [v for v in (_interpolate(c, r.macs_ratio) for c in curves) if v is not None]
        peer = max(peers) if peers else None
        margin = "-" if peer is None else f"{r.psnr - peer:+.2f}"
        shown = "-" if peer is None else f"{peer:.2f}"
        lines.append(
            f"| {r.steps} | {r.method} | {r.macs_ratio:.3f} | {r.psnr:.2f} | {shown} | {margin} |"
        )
    table(
        "Combined policy against step reuse (the better of `step` / `step+forecast`, "
        "interpolated at the same MACs):",
        ["steps", "method", "MACs", "PSNR", "step reuse at these MACs", "margin"],
        lines,
        "no `cat+reuse` run (the full study has them; `--quick` does not)",
    )
    lines = []
    for r in (r for r in main if r.method.startswith("taylorseer")):
        ours = [c for c in main if c.steps == r.steps and c.method in CATPATCH_METHODS]
        cheaper = [c for c in ours if c.macs_ratio <= r.macs_ratio + 1e-9]
        best = max(cheaper, key=lambda c: c.psnr, default=None)
        if best is None:
            lines.append(
                f"| {r.steps} | {r.method} {r.setting} | {r.macs_ratio:.3f} | "
                f"{r.psnr:.2f} | none at these MACs | - |"
            )
            continue
        lines.append(
            f"| {r.steps} | {r.method} {r.setting} | {r.macs_ratio:.3f} | {r.psnr:.2f} | "
            f"{best.psnr:.2f} ({best.method} {best.setting or f'α {best.keep_ratio:g}'}, "
            f"{best.macs_ratio:.3f}) | {best.psnr - r.psnr:+.2f} |"
        )
    table(
        "diffusers' TaylorSeerCache against catpatch's best run at no more MACs:",
        ["steps", "TaylorSeer", "MACs", "PSNR", "catpatch best (method, MACs)", "margin"],
        lines,
        "no TaylorSeerCache run (the full study has them; `--quick` does not)",
    )
    out.append(
        "\nCaption following (detector, colour and position right) below unpatched by "
        "more than two binomial standard errors:\n"
    )
    for steps in sorted({r.steps for r in main}):
        reference = next(r for r in rows if r.steps == steps and r.method == "unpatched")
        p = reference.accuracy_colour_position
        n = max((len(r.psnr_each) for r in main), default=1) or 1
        noise = 2 * np.sqrt(max(p * (1 - p), 1 / n) / n)
        low = [r for r in main if r.steps == steps and r.accuracy_colour_position < p - noise]
        names = ", ".join(f"{r.method} {r.setting or f'α {r.keep_ratio:g}'}" for r in low)
        out.append(f"- {steps} steps (unpatched {p:.3f}, 2 SE {noise:.3f}): {names or 'none'}")
    return "\n".join(out) + "\n"


def markdown_table(rows: list[Row], images: int) -> str:
    head = (
        f"| steps | method | α | t0 | C | MACs | PSNR dB (min) | SSIM | latent err | "
        f"acc colour+pos | acc all | setting |\n|{'---|' * 12}\n"
    )
    lines = []
    for r in rows:
        psnr = "∞" if r.method == "unpatched" else f"{r.psnr:.2f} ({r.psnr_min:.1f})"
        lines.append(
            f"| {r.steps} | {r.method} | {r.keep_ratio:g} | {r.warmup_steps} | "
            f"{r.num_clusters or '-'} | {r.macs_ratio:.3f} | {psnr} | {r.ssim:.4f} | "
            f"{r.latent_error:.4f} | {r.accuracy_colour_position:.3f} | {r.accuracy_all:.3f} | "
            f"{r.setting} |"
        )
    intro = f"catpatch {__version__}; {plural(images, 'image')} per configuration.\n\n"
    return intro + head + "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    """PSNR against MACs ratio, one line per method, one panel per step count; the dashed
    line is catpatch's frontier (the best PSNR at or below each MACs, over its methods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({r.steps for r in rows})
    fig, axes = plt.subplots(1, len(steps_list), figsize=(7 * len(steps_list), 5), squeeze=False)
    for ax, steps in zip(axes[0], steps_list, strict=True):
        shown = [r for r in rows if r.steps == steps and not _in_sweep(r)]
        for i, method in enumerate(METHODS):
            points = sorted((r.macs_ratio, r.psnr) for r in shown if r.method == method)
            if points:
                x, y = zip(*points, strict=True)
                style = "s--" if method.startswith("taylorseer") else "o-"
                color = plt.cm.tab20(i % 20)  # more methods than the default cycle's 10 colours
                ax.plot(x, y, style, label=method, markersize=4, color=color)
        front = frontier([r for r in shown if r.method in CATPATCH_METHODS])
        if len(front) > 1:  # one point draws no line: no legend entry for it either
            x, y = zip(*((r.macs_ratio, r.psnr) for r in front), strict=True)
            ax.step(x, y, "k:", where="post", label="catpatch frontier", linewidth=1)
        ax.set_title(f"{steps} steps (t0 8, 20 clusters)")
        ax.set_xlabel("MACs / unpatched")
        ax.set_ylabel("PSNR vs unpatched (dB)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without the default t0 / clusters has none
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier(rows: list[Row]) -> list[Row]:
    """The rows no other row beats with fewer or equal MACs and a higher PSNR, by MACs."""
    best, front = float("-inf"), []
    for row in sorted(rows, key=lambda r: (r.macs_ratio, -r.psnr)):
        if row.psnr > best:
            best = row.psnr
            front.append(row)
    return front


def _in_sweep(row: Row) -> bool:
    """A row of the t0 / cluster sweeps (CAT away from the default warm-up or clusters)."""
    defaults = CATConfig()
    return row.method == "cat" and (
        row.warmup_steps != defaults.warmup_steps or row.num_clusters != defaults.num_clusters
    )
