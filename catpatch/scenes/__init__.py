"""The scenes model: a trained SD3 pipeline whose tokens change like a real image's.

    from catpatch.scenes import CALL_KWARGS, eval_prompts, load_pipeline
    pipe = load_pipeline()
    image = pipe(eval_prompts(1)[0].prompt, **CALL_KWARGS).images[0]  # 96 x 96 px

Small landscapes (`catpatch.scenes.data`): a smooth sky and plain ground with two detailed
objects (houses with windows, leafy trees, fences) on the horizon, 96 px, 576 image tokens and
48 text tokens (SD3-medium's T/L at 1024²). Flat regions settle early in denoising and the
detail keeps moving, so which tokens change is concentrated and predictable: the testbed where
token policies can differ. The toy (`catpatch.toy`) stays the fast test bed of CI. Trained by
`python -m catpatch.scenes train` (resumable). `MODEL` (also `catpatch.trained.get("scenes")`)
and the module functions are the same as the toy's.
"""

from __future__ import annotations

from ..trained import EvalPrompt, Recipe, TrainedModel
from . import data
from .data import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, TEXT_TOKENS

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

HEIGHT = WIDTH = IMAGE_SIZE  # 96 px -> 48 x 48 latents -> 576 image tokens
NUM_INFERENCE_STEPS = MODEL.num_inference_steps
GUIDANCE_SCALE = MODEL.guidance_scale
CALL_KWARGS = MODEL.call_kwargs  # the recommended pipeline call settings
EVAL_SEED = MODEL.eval_seed

weights_dir = MODEL.weights_dir
load_pipeline = MODEL.load_pipeline
load_detector = MODEL.load_detector
eval_prompts = MODEL.eval_prompts
generate = MODEL.generate
check = MODEL.check
reference_accuracy = MODEL.reference_accuracy

__all__ = [
    "CALL_KWARGS",
    "GUIDANCE_SCALE",
    "HEIGHT",
    "MAX_SEQUENCE_LENGTH",
    "MODEL",
    "NUM_INFERENCE_STEPS",
    "TEXT_TOKENS",
    "WIDTH",
    "EvalPrompt",
    "TrainedModel",
    "check",
    "eval_prompts",
    "generate",
    "load_detector",
    "load_pipeline",
    "reference_accuracy",
    "weights_dir",
]
