"""CAT on a pipeline you already loaded: patch, generate, read the stats, restore.

python examples/quickstart.py                      # the embedded offline toy pipeline
python examples/quickstart.py --model stabilityai/stable-diffusion-3-medium-diffusers
"""

from __future__ import annotations

import argparse

import torch

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an SD3-family pipeline folder or hub id")
    parser.add_argument(
        "--prompt", default="a large red circle at the top left on a striped blue background"
    )
    args = parser.parse_args()

    if args.model:
        from diffusers import StableDiffusion3Pipeline

        cuda = torch.cuda.is_available()
        pipe = StableDiffusion3Pipeline.from_pretrained(
            args.model, torch_dtype=torch.bfloat16 if cuda else torch.float32
        ).to("cuda" if cuda else "cpu")
        call = dict(num_inference_steps=28, guidance_scale=7.0)
    else:
        from catpatch import toy

        pipe, call = toy.load_pipeline(), dict(toy.CALL_KWARGS)

    apply_cat(pipe, CATConfig(keep_ratio=0.3, warmup_steps=8))
    image = pipe(args.prompt, generator=torch.Generator().manual_seed(0), **call).images[0]
    print(cat_stats(pipe).summary())
    image.save("cat.png")
    remove_cat(pipe)  # the pipeline is exactly as it was
    pipe(args.prompt, generator=torch.Generator().manual_seed(0), **call).images[0].save("base.png")
    print("wrote cat.png and base.png")


if __name__ == "__main__":
    main()
