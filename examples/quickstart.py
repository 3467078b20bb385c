"""catpatch on a pipeline you already loaded: patch, generate, read the stats, restore.

python examples/quickstart.py                      # the toy pipeline shipped in catpatch, offline
python examples/quickstart.py --model scenes       # any model of `catpatch.models.names()`
python examples/quickstart.py --model stabilityai/stable-diffusion-3-medium-diffusers
python examples/quickstart.py --macs 0.3           # a smaller budget: at most 30% of the MACs
python examples/quickstart.py --selection cat      # CAT's token pruning (manual knobs)

The default is `CATConfig()`, a MACs budget of 0.5 planned from the model's calibration;
`--selection` / `--warmup-steps` switch to the manual policies (step reuse, CAT, ...). Writes
out/quickstart/patched.png and out/quickstart/base.png (--out to change).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default="toy",
        help="a name of catpatch.models.names() ('toy', 'scenes', 'tiny-flux', ...) or an SD3 "
        "pipeline folder / hub id",
    )  # fmt: skip
    parser.add_argument(
        "--prompt",
        default="a large red circle at the top left on a striped blue background",
        help="what to draw",
    )
    parser.add_argument("--steps", type=int, default=28, help="denoising steps")
    parser.add_argument(
        "--macs", type=float, default=None,
        help="the budget: at most this share of the unpatched MACs (default: CATConfig()'s, 0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--selection", default=None, help="a manual policy: 'step', 'cat', ... (not with --macs)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="t0 of a manual policy (default: 8)"
    )
    parser.add_argument("--out", default="out/quickstart", help="output folder")
    args = parser.parse_args(argv)

    from catpatch import models

    if args.model in models.names():
        pipe, call = models.load_pipeline(args.model), models.call_kwargs(args.model)
    else:
        from diffusers import StableDiffusion3Pipeline

        cuda = torch.cuda.is_available()
        pipe = StableDiffusion3Pipeline.from_pretrained(
            args.model, torch_dtype=torch.bfloat16 if cuda else torch.float32
        ).to("cuda" if cuda else "cpu")
        call = dict(guidance_scale=7.0)
    call["num_inference_steps"] = args.steps

    knobs = (("selection", args.selection), ("warmup_steps", args.warmup_steps))
    manual = {name: value for name, value in knobs if value is not None}
    if args.macs is not None and manual:
        parser.error("--macs plans the steps itself: drop --selection / --warmup-steps")
    config = CATConfig(macs=args.macs) if args.macs is not None else CATConfig(**manual)
    apply_cat(pipe, config)
    image = pipe(args.prompt, generator=torch.Generator().manual_seed(0), **call).images[0]
    print(cat_stats(pipe).summary())
    remove_cat(pipe)  # the pipeline is exactly as it was
    base = pipe(args.prompt, generator=torch.Generator().manual_seed(0), **call).images[0]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "patched.png")
    base.save(out / "base.png")
    print(f"wrote {out / 'patched.png'} ({config!r}) and {out / 'base.png'}")


if __name__ == "__main__":
    main()
