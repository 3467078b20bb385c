"""What `catpatch bench` times and what it refuses: `BenchSettings` (the fields mirror the
command-line options), the transformer config of a shape or model, the model's native size,
`check_settings` (one line that names the fix for what cannot be timed; a hub id is looked up
once, with a short timeout, so an offline machine fails in seconds: `config_or_error` reads the
config once and the command hands its result to `default_size` and `check_settings`) and
loading the transformer to time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ...config import CATConfig
from ...dtypes import torch_dtype
from ..budget import check_budget_steps, check_calibration
from ..common import (
    CommandError,
    cat_config,
    check_device,
    check_image_size,
    cluster_selections,
    is_builtin,
    looks_like_path,
    resolve_model,
)
from ..generate.pipeline import first_line


@dataclass
class BenchSettings:
    shape: str = "cpu-256x8"
    model: str | None = None  # "toy", a pipeline or transformer folder / hub id, not a shape
    height: int = 512
    width: int = 512
    steps: int = 28
    batch: int = 1
    cfg: bool = True
    text_tokens: int | None = None  # None: the family's default (SD3 333, FLUX 512, PixArt 300)
    keep_ratio: float = 0.3
    warmup_steps: int = 8
    num_clusters: int = 20
    selection: str = CATConfig.selection  # the library's default policy
    macs: float | None = None  # the budget (CATConfig.macs), replaces the three above; the
    # command fills in the library's default budget when no knob is given (resolve_cat_options)
    forecast: str = CATConfig.forecast  # with macs
    calibration: str | None = None  # with macs: a calibration file (None: the model's own)
    dtype: str = "fp32"
    device: str = "cpu"
    compile: str = "none"  # none | default | reduce-overhead | max-autotune
    lean: bool = True  # CATConfig.lean
    repeats: int = 3
    seed: int = 0


class BenchError(CommandError):
    """Bad settings for `catpatch bench`; the message names the fix (exit status 2)."""


def transformer_config(shape: str, model: str | None) -> dict[str, Any]:
    """The transformer config of a named shape, or of `model` (read, not loaded)."""
    if model is None:
        from ...models.shapes import transformer_config as shape_config

        return shape_config(shape)
    from diffusers import SD3Transformer2DModel

    path = resolve_model(model)
    _check_reachable(model, path)
    for kwargs in ({"subfolder": "transformer"}, {}):
        try:
            with warnings.catch_warnings():  # huggingface_hub's deprecation notices
                warnings.simplefilter("ignore")
                # reads any transformer's config.json (its "_class_name" names the class)
                return dict(SD3Transformer2DModel.load_config(path, **kwargs))
        except (OSError, ValueError) as err:
            reason = first_line(err)
    raise BenchError(
        f"--model {model}: no SD3 transformer config there, nor a FLUX or PixArt-Σ one "
        f"({reason}); pass 'toy', a pipeline or transformer folder, or a hub id (offline: a "
        f"local folder)"
    )


def _check_reachable(model: str, path: str) -> None:
    """BenchError at once for a folder that is not there or a hub id that cannot be looked up
    (no network, no such repository), instead of huggingface_hub's minute and a half of
    retries; a hub model already in the local cache passes offline."""
    import os

    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if is_builtin(model) or os.path.exists(os.path.expanduser(path)):
        return
    if looks_like_path(path):
        raise BenchError(
            f"--model {model}: no such folder; pass 'toy', a pipeline or transformer folder, "
            f"or a hub id (owner/name)"
        )
    for name in ("transformer/config.json", "config.json"):
        if isinstance(try_to_load_from_cache(path, name), str):
            return  # cached: loads offline
    if constants.HF_HUB_OFFLINE:
        raise BenchError(
            f"--model {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it first or pass a local folder"
        )
    try:
        model_info(path, timeout=10)
    except Exception as err:  # network errors come from httpx, hub errors from huggingface_hub
        reason = first_line(err)
        if "not found" in reason.lower() or "404" in reason or "401" in reason:
            raise BenchError(
                f"--model {model}: no such model on the Hugging Face hub (or it is gated: "
                f"`hf auth login`); pass 'toy', a local folder or a hub id (owner/name)"
            ) from None
        raise BenchError(
            f"--model {model}: cannot reach the Hugging Face hub ({reason}); offline, pass a "
            f"local folder or 'toy'"
        ) from None


def config_or_error(shape: str, model: str | None) -> dict[str, Any] | BenchError:
    """`transformer_config`, or the BenchError it raises: one look-up of a model that
    `default_size` and `check_settings` both take (`config=`), so a hub id that cannot be
    reached is asked for once."""
    try:
        return transformer_config(shape, model)
    except BenchError as err:
        return err


def is_flux_config(config: dict[str, Any]) -> bool:
    """Whether a transformer config is FLUX's (single-stream blocks) rather than SD3's."""
    return config.get("_class_name") == "FluxTransformer2DModel" or "num_single_layers" in config


def default_size(
    shape: str, model: str | None, config: dict[str, Any] | BenchError | None = None
) -> tuple[int, int]:
    """512x512 for a named shape; the model's sample size x 8 (its native size) for a model.
    `config`: `config_or_error(shape, model)` when the caller has it (else it is read)."""
    if model is None:
        return 512, 512
    if config is None:
        config = config_or_error(shape, model)
    if isinstance(config, BenchError):
        return 512, 512  # check_settings reports the model
    side = int(config.get("sample_size") or 64) * 8
    return side, side


def check_settings(
    settings: BenchSettings,
    device_given: bool = True,
    config: dict[str, Any] | BenchError | None = None,
) -> None:
    """BenchError for settings that cannot be timed, before anything is built or loaded.
    `config`: `config_or_error(settings.shape, settings.model)` when the caller has it."""
    if device_given:
        check_device(settings.device)
    if config is None:
        config = transformer_config(settings.shape, settings.model)
    if isinstance(config, BenchError):
        raise config
    bench_config(settings)
    budgeted = settings.macs is not None
    clusters = settings.num_clusters if settings.selection in cluster_selections() else None
    clusters = None if budgeted else clusters
    check_image_size(config, settings.height, settings.width, clusters, error=BenchError)
    if budgeted:
        check_budget_steps(settings.macs, settings.steps)
        if settings.calibration is not None:
            check_calibration(settings.calibration)
    elif settings.steps <= settings.warmup_steps:
        raise BenchError(
            f"--steps {settings.steps} must be more than --warmup-steps {settings.warmup_steps}:"
            f" a loop that short prunes nothing, so there is nothing to compare"
        )
    for name in ("batch", "text_tokens", "repeats"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1")


def bench_config(settings: BenchSettings) -> CATConfig:
    """The `CATConfig` of the patched side (CommandError naming the option if a value is
    bad): the budget with --macs, else the manual knobs."""
    budget = {}
    if settings.macs is not None:
        budget = dict(
            macs=settings.macs, forecast=settings.forecast, calibration=settings.calibration
        )
    return cat_config(
        keep_ratio=settings.keep_ratio, warmup_steps=settings.warmup_steps,
        num_clusters=settings.num_clusters, selection=settings.selection, lean=settings.lean,
        **budget,
    )  # fmt: skip


def load_transformer(settings: BenchSettings):
    """The transformer to time: a named shape with random weights, or a user's model."""
    from ...models.shapes import build_transformer

    dtype = torch_dtype(settings.dtype)
    if settings.model is None:
        # built in the bench dtype: SD3.5-large in fp32 would need twice the memory first
        model = build_transformer(
            settings.shape, seed=settings.seed, device=settings.device, dtype=dtype
        )
    else:
        import diffusers

        config = transformer_config(settings.shape, settings.model)
        default = "FluxTransformer2DModel" if is_flux_config(config) else "SD3Transformer2DModel"
        cls = getattr(diffusers, config.get("_class_name") or default)
        path = resolve_model(settings.model)  # "toy": the pipeline shipped in catpatch
        try:
            model = cls.from_pretrained(path, subfolder="transformer")
        except (OSError, ValueError):
            model = cls.from_pretrained(path)
    if model.dtype != dtype:
        model = model.to(dtype=dtype)
    return model.to(device=settings.device).eval()
