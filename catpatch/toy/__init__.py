"""A small trained SD3 pipeline shipped with catpatch, to measure image quality offline.

    from catpatch.toy import CALL_KWARGS, load_pipeline
    pipe = load_pipeline()
    image = pipe("a large red circle at the top left on a striped blue background",
                 **CALL_KWARGS).images[0]

`CALL_KWARGS` matter: the toy was trained on 16 T5 tokens per caption (`max_sequence_length`),
and the pipeline's default of 256 gives other images. The pipeline is a real
`StableDiffusion3Pipeline` (SD3 transformer, 16-channel `AutoencoderKL`, two CLIP and one T5
encoder, flow-matching Euler scheduler) at toy size, trained by `python -m catpatch.toy train`
on procedural images of one coloured shape on a textured background (`catpatch.toy.data`).
`MODEL` (a `catpatch.trained.TrainedModel`, also `catpatch.trained.get("toy")`) has the
evaluation set, the label detector and `check`; its methods are also module functions here.
"""

from __future__ import annotations

from ..trained import EvalPrompt, Recipe, TrainedModel
from . import data
from .data import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, TEXT_TOKENS

MODEL = TrainedModel(
    name="toy",
    package=__name__,
    recipe=Recipe(data, f"{__name__}.build"),
    description="the small SD3 pipeline trained for catpatch on one coloured shape on a "
    "textured background (64x64 px, 256 image tokens, offline)",
)

HEIGHT = WIDTH = IMAGE_SIZE  # 64 px -> 32 x 32 latents -> 256 image tokens
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
