"""catpatch on a pipeline you already loaded: patch, generate, read the stats, restore.

python examples/quickstart.py                      # the toy pipeline shipped in catpatch, offline
python examples/quickstart.py --model scenes       # any model of `catpatch.models.names()`
python examples/quickstart.py --model stabilityai/stable-diffusion-3-medium-diffusers
python examples/quickstart.py --selection cat      # CAT's token pruning instead of step reuse

The default policy is step reuse (`CATConfig().selection == "step"`). Writes
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
    parser.add_argument("--warmup-steps", type=int, default=8, help="t0: full steps first")
    parser.add_argument(
        "--selection", default=CATConfig().selection, help="the policy: 'step', 'cat', ..."
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

    config = CATConfig(keep_ratio=0.3, warmup_steps=args.warmup_steps, selection=args.selection)
    apply_cat(pipe, config)
    image = pipe(args.prompt, generator=torch.Generator().manual_seed(0), **call).images[0]
    print(cat_stats(pipe).summary())
    remove_cat(pipe)  # the pipeline is exactly as it was
    base = pipe(args.prompt, generator=torch.Generator().manual_seed(0), **call).images[0]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "patched.png")
    base.save(out / "base.png")
    print(f"wrote {out / 'patched.png'} ({config.selection}) and {out / 'base.png'}")


if __name__ == "__main__":
    main()
