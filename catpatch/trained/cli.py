"""Command line of a shipped trained model: `python -m catpatch.toy {train,sample,check}`
(the same for `python -m catpatch.scenes`; each package's `__main__` calls `run_module`).

python -m catpatch.toy train [--out DIR]     # train from scratch (~45 min on 2 busy CPU cores)
python -m catpatch.toy sample --out DIR      # a few images and grid.png
python -m catpatch.toy check                 # detector accuracy on generated images

An interrupted `train` resumes where it stopped when run again with the same --out and settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import TrainedModel


def _print_accuracy(title: str, acc: dict[str, float]) -> None:
    print(f"{title}: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)


def _call_kwargs(args: argparse.Namespace, model: TrainedModel) -> dict:
    steps = args.steps or model.num_inference_steps
    guidance = model.guidance_scale if args.guidance is None else args.guidance
    return dict(num_inference_steps=steps, guidance_scale=guidance)


def _train(args: argparse.Namespace, model: TrainedModel) -> None:
    from .train import TrainConfig, train

    start = time.perf_counter()
    cfg = TrainConfig(seed=args.seed, **model.train_defaults)
    if args.quick:
        cfg = TrainConfig(
            seed=args.seed,
            vae_steps=20,
            dataset_size=500,
            steps=20,
            detector_steps=40,
            log_every=10,
        )
    for item in args.set:
        name, value = item.split("=", 1)
        cfg = dataclasses.replace(cfg, **{name: type(getattr(cfg, name))(value)})
    print(cfg, flush=True)
    pipe, detector = train(args.out, cfg, model.recipe)
    pipe.set_progress_bar_config(disable=True)
    _print_accuracy("detector on procedural images", model.reference_accuracy(detector))
    n = 8 if args.quick else 64
    _print_accuracy(f"detector on {n} generated images", model.check(pipe, n, detector))
    print(f"total wall time {time.perf_counter() - start:.0f}s", flush=True)


def _sample(args: argparse.Namespace, model: TrainedModel) -> None:
    import numpy as np
    from PIL import Image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = model.eval_prompts(args.n)
    pipe = model.load_pipeline(path=args.weights)
    images = model.generate(pipe, prompts, **_call_kwargs(args, model))
    images = (images * 255).round().astype(np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"{i:03d}.png")
    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    n, h, w, _ = images.shape
    padded = np.zeros((rows * cols, h, w, 3), dtype=np.uint8)
    padded[:n] = images
    grid = padded.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, -1, 3)
    Image.fromarray(grid).save(out / "grid.png")
    lines = [f"{i:03d} seed {p.seed}: {p.prompt}\n" for i, p in enumerate(prompts)]
    (out / "captions.txt").write_text("".join(lines))
    print(f"wrote {len(images)} images, grid.png and captions.txt to {out}")


def _check(args: argparse.Namespace, model: TrainedModel) -> None:
    weights = Path(args.weights) / "detector.safetensors" if args.weights else None
    detector = model.load_detector(weights)
    _print_accuracy("detector on procedural images", model.reference_accuracy(detector))
    kwargs = _call_kwargs(args, model)
    acc = model.check(model.load_pipeline(path=args.weights), args.n, detector, **kwargs)
    _print_accuracy(
        f"detector on {args.n} generated images ({kwargs['num_inference_steps']} steps, "
        f"guidance {kwargs['guidance_scale']})",
        acc,
    )


class _Help(argparse.RawDescriptionHelpFormatter):
    """The description as written; every option's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        from ..cli.common import HelpFormatter

        return HelpFormatter._get_help_string(self, action)


def build_parser(model: str = "toy") -> argparse.ArgumentParser:
    """The parser of `python -m catpatch.<model>`."""
    from ..cli.common import Parser

    prog = f"python -m catpatch.{model}"
    parser = Parser(prog=prog, description=__doc__, formatter_class=_Help)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train", help="train the pipeline and detector from scratch", formatter_class=_Help
    )
    p.add_argument("--out", default=f"out/{model}", help="folder to save_pretrained into")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override TrainConfig fields"
    )
    for name, default_n in (("sample", 16), ("check", 64)):
        what = "a few images and grid.png" if name == "sample" else "detector accuracy"
        p = sub.add_parser(name, help=what, formatter_class=_Help)
        if name == "sample":
            p.add_argument("--out", required=True, help="required: output folder")
        p.add_argument("--n", type=int, default=default_n, help="evaluation prompts to use")
        p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 28)")
        p.add_argument("--guidance", type=float, default=None, help="guidance (default: 5.0)")
        p.add_argument("--weights", default=None, help="pipeline folder (default: shipped)")
    return parser


def main(argv: list[str] | None = None, model: str = "toy") -> None:
    """Parse the command line and run one command on the shipped model named `model`."""
    args = build_parser(model).parse_args(argv)

    import torch

    from .model import builtin_models

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = {"train": _train, "sample": _sample, "check": _check}[args.command]
    run(args, builtin_models()[model])


def run_module(model: str) -> None:
    """`python -m catpatch.<model>`: with passive OpenMP waiting (busy-waiting threads slow
    training many times over when another process shares the cores). It must be set before
    torch loads, hence the re-exec."""
    if os.environ.get("OMP_WAIT_POLICY") is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", f"catpatch.{model}", *sys.argv[1:]])
    main(model=model)
