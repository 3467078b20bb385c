"""`TrainedModel`: one SD3 pipeline trained for catpatch and shipped inside it, with its
evaluation set and label detector. The toy (`catpatch.toy`) and the scenes model
(`catpatch.scenes`) are two instances; `builtin_models` maps their `--model` names to them and
`trained_model` reads any `--model` value (a name or a training folder).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline

    from .detector import Detector


class EvalPrompt(NamedTuple):
    """One evaluation case: a caption, the seed of its initial noise, and its labels."""

    prompt: str
    seed: int
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Recipe:
    """What a shipped model is made of: its data module (`IMAGE_SIZE`, `ATTRIBUTES`, `JOINT`,
    `caption`, `random_labels`, `all_labels`, `make_batch`, `MAX_SEQUENCE_LENGTH`,
    `TEXT_TOKENS`) and the name of its build module (`T5_LENGTH`, `SCHEDULER_SHIFT`,
    `text_components`, `vae_model`, `transformer_model`, `assemble`), imported when needed
    because it imports torch and diffusers."""

    data: ModuleType
    build_module: str

    @property
    def build(self) -> ModuleType:
        return importlib.import_module(self.build_module)


@dataclass(frozen=True)
class TrainedModel:
    """A shipped trained pipeline: where its weights are and how it is called and scored."""

    name: str
    package: str  # the package whose `weights/` folder holds the pipeline and detector
    recipe: Recipe
    description: str
    num_inference_steps: int = 28
    guidance_scale: float = 5.0
    eval_seed: int = 2024
    # `TrainConfig` fields this model trains with where they differ from the defaults.
    train_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> ModuleType:
        return self.recipe.data

    @property
    def height(self) -> int:
        return self.data.IMAGE_SIZE

    @property
    def text_tokens(self) -> int:
        """T of the transformer's calls (CLIP + T5 tokens)."""
        return self.data.TEXT_TOKENS

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """Recommended pipeline call settings (all others at their defaults). The model was
        trained at `max_sequence_length` T5 tokens: the pipeline's default of 256 gives other
        images."""
        return dict(
            height=self.data.IMAGE_SIZE,
            width=self.data.IMAGE_SIZE,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            max_sequence_length=self.data.MAX_SEQUENCE_LENGTH,
        )

    def weights_dir(self) -> Path:
        """The shipped `save_pretrained` folder (package data `<package>/weights`)."""
        return Path(str(resources.files(self.package).joinpath("weights")))

    def load_pipeline(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        path: str | Path | None = None,
    ) -> StableDiffusion3Pipeline:
        """The trained pipeline, loaded offline (float32 on CPU unless told otherwise), quietly:
        no loading bars and no notices about torchvision, which it does not use."""
        import torch

        from .._quiet import quiet_loading
        from ..dtypes import from_pretrained_dtype

        with quiet_loading(progress=False):
            from diffusers import StableDiffusion3Pipeline

            pipe = StableDiffusion3Pipeline.from_pretrained(
                str(path or self.weights_dir()),
                local_files_only=True,
                **from_pretrained_dtype(dtype or torch.float32),
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device) if device is not None else pipe

    def load_detector(self, path: str | Path | None = None) -> Detector:
        """The trained label detector (`weights/detector.safetensors` unless `path` is given)."""
        from .detector import DETECTOR_FILE
        from .detector import load_detector as _load

        return _load(path or self.weights_dir() / DETECTOR_FILE, self.data)

    def eval_prompts(self, n: int = 64) -> list[EvalPrompt]:
        """A fixed list of `n` caption / seed pairs; a shorter list is a prefix of a longer
        one."""
        rng = np.random.default_rng(self.eval_seed)
        cases = []
        for i in range(n):
            labels = self.data.random_labels(rng)
            cases.append(EvalPrompt(self.data.caption(labels), self.eval_seed + i, labels))
        return cases

    def generate(
        self, pipe: Any, prompts: list[EvalPrompt], batch_size: int = 8, **call_kwargs: Any
    ) -> np.ndarray:
        """Images (N, H, W, 3) in [0, 1] for `prompts`, each from its own seeded noise; with
        `output_type="latent"` the final latents (N, C, h, w) instead.

        `call_kwargs` go to the pipeline call (default `call_kwargs`); an image does not depend
        on `batch_size` or on the other prompts of its batch.
        """
        import torch

        kwargs = {**self.call_kwargs, "output_type": "np", **call_kwargs}
        images = []
        for i in range(0, len(prompts), batch_size):
            part = prompts[i : i + batch_size]
            gens = [torch.Generator().manual_seed(p.seed) for p in part]
            out = pipe(prompt=[p.prompt for p in part], generator=gens, **kwargs)
            images.append(out.images)
        return torch.cat(images) if kwargs["output_type"] == "latent" else np.concatenate(images)

    def score(self, detector: Detector, images: np.ndarray, labels: np.ndarray) -> dict:
        """Detector accuracy of (N, H, W, 3) images against their labels (N, attributes)."""
        from .detector import accuracy

        return accuracy(detector.predict(images), labels, self.data)

    def check(
        self, pipe: Any = None, n: int = 64, detector: Detector | None = None, **call_kwargs: Any
    ) -> dict[str, float]:
        """Detector accuracy on `n` generated evaluation images against their captions'
        labels."""
        pipe = pipe if pipe is not None else self.load_pipeline()
        detector = detector if detector is not None else self.load_detector()
        prompts = self.eval_prompts(n)
        images = self.generate(pipe, prompts, **call_kwargs)
        return self.score(detector, images, np.array([p.labels for p in prompts]))

    def reference_accuracy(self, detector: Detector | None = None, n: int = 1024) -> dict:
        """Detector accuracy on `n` real procedural images (a fixed seeded sample)."""
        detector = detector if detector is not None else self.load_detector()
        images, labels = self.data.make_batch(n, np.random.default_rng(self.eval_seed + 1))
        return self.score(detector, images.transpose(0, 2, 3, 1), labels)


MODEL_FILE = "trained_model.json"  # written by `train` beside the pipeline: which recipe


# `--model` name -> the package that holds the model's `MODEL`, data and weights. Imported when
# asked for: each package builds its `MODEL` from this one, so this one cannot import them first.
BUILTIN = {"toy": "catpatch.toy", "scenes": "catpatch.scenes"}


def builtin_models() -> dict[str, TrainedModel]:
    """The shipped trained models by their `--model` name."""
    return {name: importlib.import_module(package).MODEL for name, package in BUILTIN.items()}


def get(name: str) -> TrainedModel:
    """The shipped trained model called `name` ('toy' or 'scenes'); ValueError naming the
    choices for any other name."""
    if name not in BUILTIN:
        raise ValueError(
            f"no shipped trained model {name!r}; use one of {', '.join(map(repr, BUILTIN))}"
        )
    return importlib.import_module(BUILTIN[name]).MODEL


def trained_model(model: str | Path) -> tuple[TrainedModel, Path | None]:
    """The trained model of a `--model` value and its folder: a built-in name gives (that
    model, None); a folder written by `python -m catpatch.<name> train` gives (the model of its
    recipe, the folder) — folders without `trained_model.json` (older toy runs) are the toy's.
    """
    import json

    models = builtin_models()
    if str(model) in models:
        return models[str(model)], None
    folder = Path(model).expanduser()
    data_module = "catpatch.toy.data"
    if (folder / MODEL_FILE).is_file():
        data_module = json.loads((folder / MODEL_FILE).read_text())["data"]
    for candidate in models.values():
        if candidate.data.__name__ == data_module:
            return candidate, folder
    raise ValueError(f"{folder / MODEL_FILE}: unknown data module {data_module}")
