"""The scenes model: a trained SD3 pipeline whose tokens change like a real image's.

    from catpatch.scenes import MODEL
    pipe = MODEL.load_pipeline()
    images = MODEL.generate(pipe, MODEL.eval_prompts(16))  # (16, 96, 96, 3) in [0, 1]

Small landscapes (`catpatch.scenes.data`): a smooth sky and plain ground with two detailed
objects (houses with windows, leafy trees, fences) on the horizon, 96 px, 576 image tokens and
48 text tokens (SD3-medium's T/L at 1024²). Flat regions settle early in denoising and the
detail keeps moving, so which tokens change is concentrated and predictable: the testbed where
token policies can differ. The toy (`catpatch.toy`) stays the fast test bed of CI. Trained by
`python -m catpatch.scenes train` (resumable); `MODEL` has the same methods as the toy's.
"""

from __future__ import annotations

from ..toy.model import Recipe, TrainedModel
from . import data

MODEL = TrainedModel(
    name="scenes",
    package=__name__,
    recipe=Recipe(data, f"{__name__}.build"),
    description="a small SD3 pipeline trained for catpatch on landscapes with flat sky and "
    "ground and detailed objects (96x96 px, 576 image tokens, offline)",
    train_defaults=dict(
        autocast=True, dataset_size=10000, steps=2000, batch=24, vae_steps=300, log_every=50
    ),
)

__all__ = ["MODEL"]
