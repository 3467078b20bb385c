"""`catpatch eval`: compare two `catpatch generate` outputs image by image.

    catpatch eval --reference out/base --candidate out/cat --clip-model clip-vit-l14 --json e.json

Images pair up by file name through the two manifests (same prompt and seed required). Per pair:
PSNR (dB, of the candidate against the reference, pixels in [0, 1]; infinite for identical
images) and SSIM (Gaussian 11x11, sigma 1.5) always; with `--clip-model` (a local CLIP folder or
a hub id) the CLIP score of each image against its prompt, max(100·cos, 0); with `--lpips` the
LPIPS distance (AlexNet), which needs torchvision and its downloaded weights. Metrics come from
torchmetrics. JSON stores an infinite PSNR as null (counted as `identical`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .._quiet import quiet_loading
from .common import (
    CommandError,
    HelpFormatter,
    Parser,
    check_device,
    check_output_folder,
    fail,
    plural,
)
from .generate import MANIFEST, first_line, read_records
from .timing import bound_note

METRICS = {  # key: label in the table
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "clip_reference": "CLIP reference",
    "clip_candidate": "CLIP candidate",
    "clip_delta": "CLIP cand - ref",
    "lpips": "LPIPS",
}


class EvalError(CommandError):
    """A user error of `catpatch eval`; the message names the fix (exit status 2)."""


@dataclass
class EvalResult:
    """Per-image metrics of two `generate` folders and their summary."""

    reference: str
    candidate: str
    counts: dict[str, int]
    images: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # settings, time, CAT figures

    def to_dict(self) -> dict[str, Any]:
        return _finite(
            {
                "catpatch_version": __version__,
                "reference": self.reference,
                "candidate": self.candidate,
                "counts": self.counts,
                "summary": self.summary,
                "runs": self.runs,
                "images": self.images,
            }
        )

    def table(self) -> str:
        c = self.counts
        lines = [
            f"reference {self.reference}  vs  candidate {self.candidate}",
            f"{c['pairs']} pairs ({c['identical']} identical); only in reference "
            f"{c['only_reference']}, only in candidate {c['only_candidate']}",
            f"{'metric':<16}{'n':>6}{'mean':>10}{'median':>10}{'min':>10}{'max':>10}",
        ]
        for key, s in self.summary.items():
            values = "".join(f"{s[k]:>10.4g}" for k in ("mean", "median", "min", "max"))
            lines.append(f"{METRICS[key]:<16}{s['n']:>6}{values}")
        for name in ("reference", "candidate"):
            run = self.runs[name]
            cat = run.get("cat")
            settings = run["settings"]
            what = (
                f"{settings.get('policy')} (--macs {settings['macs']:g})"
                if settings.get("macs") is not None
                else f"CAT keep {settings.get('keep_ratio')}, t0 {settings.get('warmup_steps')}"
            )
            text = (
                f"{what}: MACs ratio {cat['macs_ratio']:.3f}, "
                f"image tokens computed {cat['computed_fraction']:.1%}"
                if cat
                else "no CAT"
            )
            lines.append(f"{name}: {text}")
        lines.append(self.timing_line())
        return "\n".join(lines)

    def timing_line(self) -> str:
        """Warm time per image of both runs, or why there is none to compare."""
        ref, cand = self.runs["reference"], self.runs["candidate"]
        if ref["time_s"] is None or cand["time_s"] is None:
            return (
                "time per image: not shown (a run has no warm batch: the first batch of each "
                "process is a cold start; make more images, or time with `catpatch bench`)"
            )
        keys = ("device", "dtype", "batch_size", "height", "width", "steps", "world_size")
        differ = [k for k in keys if ref["settings"].get(k) != cand["settings"].get(k)]
        if differ:
            return f"time per image: not compared (the runs differ in {', '.join(differ)})"
        ratio = ref["time_s"] / cand["time_s"]
        line = (
            f"time per image, warm batches only: reference {ref['time_s']:.3g} s "
            f"({plural(ref['timed'], 'image')}), candidate {cand['time_s']:.3g} s "
            f"({plural(cand['timed'], 'image')}): {ratio:.2f}x (from the manifests; `catpatch "
            f"bench` times the denoising loop alone)"
        )
        if cand.get("cat") and not ref.get("cat"):  # CAT against unpatched: bounded by MACs
            note = bound_note(ratio, 1 / cand["cat"]["macs_ratio"])
            line += f"\nwarning: {note}" if note else ""
        return line


def _finite(value: Any) -> Any:
    """The same structure with non-finite floats as None (valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _records(folder: str | Path, role: str) -> dict[str, dict[str, Any]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"--{role} {folder}: no such folder")
    records = {f: r for f, r in read_records(folder).items() if (folder / f).is_file()}
    if not records:
        raise EvalError(
            f"--{role} {folder}: no {MANIFEST} with images; point it at a `catpatch generate` "
            f"output folder"
        )
    return records


def _load(path: Path):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W) uint8


def _clip_metric(name: str, device):
    """torchmetrics `CLIPScore` on a local CLIP folder (or hub id)."""
    import torch
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class Unwrapped(torch.nn.Module):
        """transformers >= 5 returns model outputs from get_*_features; torchmetrics 1.9
        expects tensors (Lightning-AI/torchmetrics#3407)."""

        def __init__(self, clip):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_image_features(self, *args, **kwargs):
            return _tensor(self.clip.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return _tensor(self.clip.get_text_features(*args, **kwargs))

    def load():
        with quiet_loading():  # no notices about torchvision, which CLIPScore does not need
            model = CLIPModel.from_pretrained(name).eval()
            return Unwrapped(model), CLIPProcessor.from_pretrained(name)

    try:
        return CLIPScore(model_name_or_path=load).to(device)
    except (OSError, ValueError) as err:
        raise EvalError(
            f"--clip-model {name}: cannot load a CLIP model and processor ({first_line(err)}); "
            f"download one first, e.g. `hf download openai/clip-vit-large-patch14 --local-dir "
            f"clip-l14`"
        ) from None


def _tensor(output):
    return output if hasattr(output, "norm") else output.pooler_output


def _lpips_metric(device):
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except (ImportError, OSError, RuntimeError) as err:
        raise EvalError(
            f"--lpips needs torchvision (install the build matching your torch, e.g. `pip "
            f"install torchvision`) and the AlexNet/LPIPS weights that torchvision downloads on "
            f"first use; run once with network access or drop --lpips ({first_line(err)})"
        ) from None
    return metric.to(device)


def evaluate(
    reference: str | Path,
    candidate: str | Path,
    clip_model: str | None = None,
    lpips: bool = False,
    device: str | None = None,
) -> EvalResult:
    """Compare the images of two `catpatch generate` folders paired by file name."""
    import numpy as np
    import torch

    try:
        from torchmetrics.functional.image import (
            peak_signal_noise_ratio,
            structural_similarity_index_measure,
        )
    except ImportError:
        raise EvalError(
            "catpatch eval needs torchmetrics: pip install 'torchmetrics>=1.9'"
        ) from None

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref, cand = _records(reference, "reference"), _records(candidate, "candidate")
    names = sorted(set(ref) & set(cand), key=lambda f: (ref[f]["prompt_index"], f))
    if not names:
        raise EvalError(f"{reference} and {candidate} have no image file names in common")
    for name in names:
        for key in ("prompt", "seed"):
            if ref[name].get(key) != cand[name].get(key):
                raise EvalError(
                    f"{name} was made from {key} {ref[name].get(key)!r} in the reference and "
                    f"{cand[name].get(key)!r} in the candidate: generate both runs with the same "
                    f"prompts and --seed"
                )
    clip = _clip_metric(clip_model, device) if clip_model else None
    lpips_metric = _lpips_metric(device) if lpips else None

    images, identical = [], 0
    with torch.no_grad():
        for name in names:
            r = _load(Path(reference) / name).to(device)
            c = _load(Path(candidate) / name).to(device)
            if r.shape != c.shape:
                raise EvalError(f"{name}: sizes differ ({tuple(r.shape)} vs {tuple(c.shape)})")
            identical += bool(torch.equal(r, c))
            rf, cf = r[None].double() / 255, c[None].double() / 255  # float32 SSIM: 1 - 1e-6
            row = {
                "file": name,
                "prompt": ref[name]["prompt"],
                "psnr": float(peak_signal_noise_ratio(cf, rf, data_range=1.0)),
                "ssim": float(structural_similarity_index_measure(cf, rf, data_range=1.0)),
            }
            if clip is not None:
                row["clip_reference"] = float(clip(r, row["prompt"]))
                row["clip_candidate"] = float(clip(c, row["prompt"]))
                row["clip_delta"] = row["clip_candidate"] - row["clip_reference"]
            if lpips_metric is not None:
                row["lpips"] = float(lpips_metric(cf.float(), rf.float()))
            images.append(row)

    summary = {}
    for key in METRICS:
        values = np.array([row[key] for row in images if key in row], dtype=float)
        if values.size:
            summary[key] = {
                "n": int(values.size),
                "mean": float(values.mean()),
                "median": float(np.median(values)),
                "min": float(values.min()),
                "max": float(values.max()),
            }
    counts = {
        "pairs": len(names),
        "identical": identical,
        "only_reference": len(set(ref) - set(cand)),
        "only_candidate": len(set(cand) - set(ref)),
    }
    runs = {"reference": _run_info(ref, names), "candidate": _run_info(cand, names)}
    return EvalResult(str(reference), str(candidate), counts, images, summary, runs)


def _run_info(records: dict[str, dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Settings, mean time per image and mean CAT figures of the paired records of a run.

    The time is the mean over warm images only (`warm` in the manifest: not the first batch of
    a process, whose time includes loading, compilation and allocator warm-up); None if there
    are none."""
    rows = [records[n] for n in names]
    warm = [r["time_s"] for r in rows if r.get("warm") and r.get("time_s") is not None]
    info: dict[str, Any] = {
        "settings": rows[0].get("settings", {}),
        "time_s": sum(warm) / len(warm) if warm else None,
        "timed": len(warm),
        "cat": None,
    }
    cats = [r["cat"] for r in rows if r.get("cat")]
    if cats:
        # numbers averaged; anything else (a budgeted run's computed steps) as the first has it
        info["cat"] = {
            k: sum(c[k] for c in cats) / len(cats) if isinstance(v, (int, float)) else v
            for k, v in cats[0].items()
        }
    return info


# ---- the command line ------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `catpatch eval`."""
    p.add_argument(
        "--reference", required=True, help="required: a `generate` folder (e.g. the --no-cat run)"
    )
    p.add_argument(
        "--candidate", required=True, help="required: a `generate` folder (e.g. the CAT run)"
    )
    p.add_argument(
        "--clip-model",
        help="CLIP folder (or hub id) for prompt-image CLIP scores (default: no CLIP score)",
    )
    p.add_argument("--lpips", action="store_true", help="also LPIPS (needs torchvision)")
    p.add_argument(
        "--json", help="write the per-image metrics and summary to this file (default: none)"
    )
    p.add_argument("--device", help="default: cuda if available, else cpu")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` on the `catpatch` subcommands."""
    p = subparsers.add_parser(
        "eval",
        formatter_class=HelpFormatter,
        help="compare two `generate` outputs image by image (PSNR, SSIM, CLIP, LPIPS)",
        description="Pair the images of two `catpatch generate` folders by file name and "
        "print PSNR and SSIM of the candidate against the reference, CLIP scores against the "
        "prompts with --clip-model, LPIPS with --lpips; optionally write JSON.",
    )
    add_arguments(p)
    p.set_defaults(func=command)
    return p


def command(args: argparse.Namespace) -> int:
    """Run `catpatch eval` from parsed arguments; the exit code."""
    try:
        check_device(args.device)
        if args.json:
            check_output_folder(Path(args.json).expanduser().parent, "--json")
        result = evaluate(args.reference, args.candidate, args.clip_model, args.lpips, args.device)
    except CommandError as err:
        return fail("eval", err)
    print(result.table())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m catpatch.cli.evaluate ...`: the same as `catpatch eval ...`."""
    parser = Parser(prog="catpatch eval", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
