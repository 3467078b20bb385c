"""A small trained SD3 pipeline shipped with catpatch, to measure image quality offline.

    from catpatch.toy import CALL_KWARGS, eval_prompts, generate, load_pipeline
    pipe = load_pipeline()
    images = generate(pipe, eval_prompts(64), **CALL_KWARGS)  # (64, 64, 64, 3) in [0, 1]

The pipeline is a real `StableDiffusion3Pipeline` (SD3 transformer, 16-channel `AutoencoderKL`,
two CLIP and one T5 encoder, flow-matching Euler scheduler) at toy size, trained by
`python -m catpatch.toy train` on procedural images of one coloured shape on a textured
background (`catpatch.toy.data`). `load_detector` returns the CNN that reads an image's labels
back, and `check` scores generated images against their captions.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .data import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, TEXT_TOKENS, Labels, caption, random_labels

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline

    from .detector import Detector

HEIGHT = WIDTH = IMAGE_SIZE  # 64 px -> 32 x 32 latents -> 256 image tokens
NUM_INFERENCE_STEPS = 28
GUIDANCE_SCALE = 5.0
# Recommended pipeline call settings (all other arguments at their defaults). The toy was
# trained on 16 T5 tokens per caption: the pipeline's default of 256 gives other images.
CALL_KWARGS: dict[str, Any] = dict(
    height=HEIGHT,
    width=WIDTH,
    num_inference_steps=NUM_INFERENCE_STEPS,
    guidance_scale=GUIDANCE_SCALE,
    max_sequence_length=MAX_SEQUENCE_LENGTH,
)
EVAL_SEED = 2024


def weights_dir() -> Path:
    """The shipped `save_pretrained` folder (package data `catpatch/toy/weights`)."""
    return Path(str(resources.files(__name__).joinpath("weights")))


def load_pipeline(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    path: str | Path | None = None,
) -> StableDiffusion3Pipeline:
    """The trained toy pipeline, loaded offline (float32 on CPU unless told otherwise), quietly:
    no loading bars (it takes a second) and no notices about torchvision, which it does not use.
    """
    import torch

    from .._quiet import quiet_loading
    from ..dtypes import from_pretrained_dtype

    with quiet_loading(progress=False):
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(
            str(path or weights_dir()),
            local_files_only=True,
            **from_pretrained_dtype(dtype or torch.float32),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def load_detector(path: str | Path | None = None) -> Detector:
    """The trained label detector (`weights/detector.safetensors` unless `path` is given)."""
    from .detector import DETECTOR_FILE
    from .detector import load_detector as _load

    return _load(path or weights_dir() / DETECTOR_FILE)


class EvalPrompt(NamedTuple):
    """One evaluation case: a caption, the seed of its initial noise, and its labels."""

    prompt: str
    seed: int
    labels: Labels


def eval_prompts(n: int = 64) -> list[EvalPrompt]:
    """A fixed list of `n` caption / seed pairs; a shorter list is a prefix of a longer one."""
    rng = np.random.default_rng(EVAL_SEED)
    cases = []
    for i in range(n):
        labels = random_labels(rng)
        cases.append(EvalPrompt(caption(labels), EVAL_SEED + i, labels))
    return cases


def generate(
    pipe: Any, prompts: list[EvalPrompt], batch_size: int = 8, **call_kwargs: Any
) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] for `prompts`, each from its own seeded noise; with
    `output_type="latent"` the final latents (N, C, h, w) instead.

    `call_kwargs` go to the pipeline call (default `CALL_KWARGS`); an image does not depend on
    `batch_size` or on the other prompts of its batch.
    """
    import torch

    kwargs = {**CALL_KWARGS, "output_type": "np", **call_kwargs}
    images = []
    for i in range(0, len(prompts), batch_size):
        part = prompts[i : i + batch_size]
        gens = [torch.Generator().manual_seed(p.seed) for p in part]
        out = pipe(prompt=[p.prompt for p in part], generator=gens, **kwargs)
        images.append(out.images)
    return torch.cat(images) if kwargs["output_type"] == "latent" else np.concatenate(images)


def check(
    pipe: Any = None, n: int = 64, detector: Detector | None = None, **call_kwargs: Any
) -> dict[str, float]:
    """Detector accuracy on `n` generated evaluation images against their captions' labels."""
    from .detector import accuracy

    pipe = pipe if pipe is not None else load_pipeline()
    detector = detector if detector is not None else load_detector()
    prompts = eval_prompts(n)
    images = generate(pipe, prompts, **call_kwargs)
    return accuracy(detector.predict(images), np.array([p.labels for p in prompts]))


def reference_accuracy(detector: Detector | None = None, n: int = 1024) -> dict[str, float]:
    """Detector accuracy on `n` real procedural images (a fixed seeded sample)."""
    from .data import make_batch
    from .detector import accuracy

    detector = detector if detector is not None else load_detector()
    images, labels = make_batch(n, np.random.default_rng(EVAL_SEED + 1))
    return accuracy(detector.predict(images.transpose(0, 2, 3, 1)), labels)


__all__ = [
    "CALL_KWARGS",
    "GUIDANCE_SCALE",
    "HEIGHT",
    "MAX_SEQUENCE_LENGTH",
    "NUM_INFERENCE_STEPS",
    "TEXT_TOKENS",
    "WIDTH",
    "EvalPrompt",
    "check",
    "eval_prompts",
    "generate",
    "load_detector",
    "load_pipeline",
    "reference_accuracy",
    "weights_dir",
]
