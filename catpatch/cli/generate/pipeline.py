"""The pipeline of a run: `load_pipeline` loads a saved folder or hub id with errors that name
the fix, `_as_text_to_image` turns any supported pipeline (SD3 family, FLUX.1, PixArt-Σ) into
its family's text-to-image one,
`check_size` checks HxW against the model, `_cat_config` builds the run's `CATConfig` and
`_prepare` loads the LoRA and applies CAT (or torch.compile) before the first image.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any

from ...dtypes import from_pretrained_dtype
from ..common import (
    CommandError,
    cat_config,
    check_image_size,
    cluster_selections,
    is_builtin,
    looks_like_path,
    resolve_model,
)
from .settings import GenerateError, GenerateSettings


def load_pipeline(model: str, device: Any, dtype: Any):
    """`DiffusionPipeline.from_pretrained(model)` on `device` in `dtype`, with clear errors;
    `model` may also be a built-in name (`toy`, `scenes`: the pipelines shipped in catpatch)."""
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
    elif looks_like_path(model):
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
    return _to_device(pipe, device, dtype)


def _to_device(pipe, device: Any, dtype: Any):
    """`pipe.to(device)`. fp16 on the CPU runs with the torch versions catpatch supports (the
    toy at 12 steps: PSNR 53.9 dB against fp32, 0.80 s against 0.58 s for fp32), so diffusers'
    warning that it "will fail" is replaced by one line saying it is slower."""
    import torch

    from ..common import warn

    if torch.device(device).type == "cpu" and dtype == torch.float16:
        warn(
            "generate",
            "--dtype fp16 on the CPU works but is slower than fp32 there (CPUs have few "
            "half-precision kernels); use fp32 on a CPU, fp16 or bf16 on a GPU",
        )
        return pipe.to(device, silence_dtype_warnings=True)
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
    position embedding, and (for CAT) at least `num_clusters` image tokens (the check `bench`
    and `census` share, `common.check_image_size`)."""
    check_image_size(
        pipe.transformer.config, height, width, num_clusters,
        vae_scale=int(pipe.vae_scale_factor), error=GenerateError,
    )  # fmt: skip


def check_lora(lora: str) -> None:
    """GenerateError for a `--lora` that names a file or folder that is not there (diffusers
    would take it for a malformed hub id)."""
    path = Path(lora).expanduser()
    if not path.exists() and looks_like_path(lora):
        raise GenerateError(
            f"--lora {lora}: no such file or folder; pass a LoRA folder, a .safetensors file or "
            f"a hub id (owner/name)"
        )


def _cat_config(settings: GenerateSettings):
    budget = {}
    if settings.macs is not None:  # the budget: the manual knobs stay at their defaults
        budget = dict(
            macs=settings.macs, forecast=settings.forecast, calibration=settings.calibration
        )
    try:
        return cat_config(
            keep_ratio=settings.keep_ratio,
            warmup_steps=settings.warmup_steps,
            num_clusters=settings.num_clusters,
            selection=settings.selection,
            compile="default" if settings.compile else None,
            **budget,
        )
    except CommandError as err:
        raise GenerateError(str(err)) from None


def _prepare(pipe, settings: GenerateSettings, height: int, width: int):
    """LoRA, then CAT or torch.compile; returns (pipeline, extra call kwargs)."""
    clusters = settings.cat and settings.macs is None and settings.selection in cluster_selections()
    check_size(pipe, height, width, settings.num_clusters if clusters else None)
    extra: dict[str, Any] = {}
    from ...trained import builtin_models

    builtin = builtin_models().get(settings.model)
    if builtin is not None:  # the T5 length the shipped model learned
        extra["max_sequence_length"] = builtin.call_kwargs["max_sequence_length"]
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
        check_lora(settings.lora)
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
