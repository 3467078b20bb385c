"""The pipeline of a run: `load_pipeline` loads a saved folder or hub id with errors that name
the fix, `_as_text_to_image` turns any supported pipeline (SD3 family, FLUX.1, PixArt-Σ) into
its family's text-to-image one,
`check_size` checks HxW against the model, `_cat_config` builds the run's `CATConfig` and
`_prepare` loads the LoRA and applies CAT (or torch.compile) before the first image.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any

from ...dtypes import from_pretrained_dtype
from ..common import CommandError, cat_config, is_builtin, resolve_model
from .settings import GenerateError, GenerateSettings


def _looks_like_path(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") != 1


def load_pipeline(model: str, device: Any, dtype: Any):
    """`DiffusionPipeline.from_pretrained(model)` on `device` in `dtype`, with clear errors;
    `model` may also be a built-in name (`toy`: the pipeline shipped in catpatch)."""
    from ..._quiet import quiet_loading

    builtin = is_builtin(model)
    with quiet_loading(progress=not builtin):  # no torchvision notices; the toy loads in 1 s
        return _load(resolve_model(model), device, dtype)


def _load(model: str, device: Any, dtype: Any):
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise GenerateError(
                f"{model} is not a diffusers pipeline folder (no model_index.json): pass the "
                f"folder written by pipe.save_pretrained(...) or a hub id"
            )
        model = str(path)
    elif _looks_like_path(model):
        raise GenerateError(
            f"model folder {model} does not exist: pass a pipeline folder (pipe.save_pretrained) "
            f"or a hub id such as stabilityai/stable-diffusion-3-medium-diffusers"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **from_pretrained_dtype(dtype))
    except (OSError, ValueError) as err:
        raise GenerateError(
            f"could not load {model}: {first_line(err)} (a hub model needs network access and, "
            f"for gated models, `hf auth login`; offline, pass a local folder)"
        ) from None
    return pipe.to(device)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type name if it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _as_text_to_image(pipe):
    """The text-to-image pipeline of `pipe`'s family (each family lists it first);
    GenerateError if no family supports `pipe`."""
    import diffusers

    from ...families import pipeline_family

    family = pipeline_family(pipe)
    if family is None:
        raise GenerateError(
            f"{type(pipe).__name__} is not a supported SD3-family, FLUX or PixArt-Σ pipeline; "
            f"catpatch generate needs a StableDiffusion3Pipeline checkpoint (SD3-medium, "
            f"SD3.5-medium/large), a FluxPipeline one (FLUX.1-dev, FLUX.1-schnell) or a "
            f"PixArtSigmaPipeline one"
        )
    text_to_image = getattr(diffusers, family.pipelines[0])
    return pipe if isinstance(pipe, text_to_image) else text_to_image.from_pipe(pipe)


def check_size(pipe, height: int, width: int, num_clusters: int | None = None) -> None:
    """GenerateError unless HxW fits the model: multiples of VAE scale × patch size, within the
    position embedding, and (for CAT) at least `num_clusters` image tokens."""
    vae = int(pipe.vae_scale_factor)
    config = pipe.transformer.config
    # FLUX packs 2x2 latents per token (its transformer's patch_size is 1)
    patch = 2 if hasattr(config, "num_single_layers") else int(config.patch_size)
    unit = vae * patch
    if height % unit or width % unit or height <= 0 or width <= 0:
        fit = "x".join(str(max(unit, round(v / unit) * unit)) for v in (height, width))
        raise GenerateError(
            f"--size {height}x{width}: height and width must be positive multiples of {unit} "
            f"(VAE scale factor {vae} x patch size {patch}) for this model, e.g. {fit}"
        )
    limit = getattr(config, "pos_embed_max_size", None)
    if limit and max(height, width) > limit * unit:
        raise GenerateError(
            f"--size {height}x{width}: this model's position embedding allows at most "
            f"{limit * unit} pixels per side, e.g. --size {limit * unit}x{limit * unit}"
        )
    tokens = (height // unit) * (width // unit)
    if num_clusters is not None and num_clusters > tokens:
        raise GenerateError(
            f"--num-clusters {num_clusters} exceeds the {tokens} image tokens at {height}x{width}:"
            f" lower --num-clusters or raise --size"
        )


def _cat_config(settings: GenerateSettings):
    try:
        return cat_config(
            keep_ratio=settings.keep_ratio,
            warmup_steps=settings.warmup_steps,
            num_clusters=settings.num_clusters,
            compile="default" if settings.compile else None,
        )
    except CommandError as err:
        raise GenerateError(str(err)) from None


def _prepare(pipe, settings: GenerateSettings, height: int, width: int):
    """LoRA, then CAT or torch.compile; returns (pipeline, extra call kwargs)."""
    check_size(pipe, height, width, settings.num_clusters if settings.cat else None)
    extra: dict[str, Any] = {}
    if settings.model == "toy":
        from ...toy import MAX_SEQUENCE_LENGTH

        extra["max_sequence_length"] = MAX_SEQUENCE_LENGTH  # the T5 length the toy learned
    if "clean_caption" in inspect.signature(pipe.__call__).parameters:
        # PixArt's caption cleaning needs beautifulsoup4 and ftfy; without them the pipeline
        # warns on every call and turns it off anyway
        extra["clean_caption"] = all(importlib.util.find_spec(m) for m in ("bs4", "ftfy"))
    if settings.lora and not hasattr(pipe, "load_lora_weights"):
        raise GenerateError(
            f"{type(pipe).__name__} has no LoRA loader in diffusers; drop --lora, or load the "
            f"LoRA yourself and pass the pipeline to catpatch.cli.generate.run(settings, pipe=pipe)"
        )
    if settings.lora:
        try:
            pipe.load_lora_weights(settings.lora)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
            message = f"could not load the LoRA {settings.lora}: {first_line(err)}"
            raise GenerateError(message) from None
        extra["joint_attention_kwargs"] = {"scale": settings.lora_scale}
    if settings.cat:
        from ...patching import apply_cat

        try:
            apply_cat(pipe, _cat_config(settings))
        except (TypeError, ValueError) as err:
            raise GenerateError(str(err)) from None
    elif settings.compile:
        pipe.transformer.compile()
    return pipe, extra
