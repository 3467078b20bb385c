"""`apply_cat`, `remove_cat`, `cat_generation`: put CAT on a pipeline or transformer, take it off.

A patch touches only the given objects: hooks and per-instance `forward` overrides on the
transformer (made by its family's adapter, see `families.py`), and on a pipeline a wrapt
wrapper around the instance's `progress_bar`, whose `with` block is exactly one denoising loop:
entering it starts a run (state reset), leaving it, also by an exception or an interrupt, ends
the run (caches freed), and each `update()` of the bar ends a step.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np

from .config import CATConfig
from .families import FAMILIES, family_of, pipeline_family, supported_transformers
from .hooks import PatchSet, wrap_denoising_loops
from .state import CATState

T = TypeVar("T")
_ATTRIBUTE = "_catpatch"
SUPPORTED_PIPELINES = tuple(name for family in FAMILIES for name in family.pipelines)


def check_transformer(transformer) -> None:
    """Raise `TypeError` naming the fix if no family's adapter can serve `transformer`."""
    family = family_of(transformer)
    if family is None:
        raise TypeError(
            f"expected a transformer of a supported family, got {type(transformer).__name__}; "
            f"CAT supports SD3-family transformers, FLUX.1 and PixArt-Σ: "
            f"{supported_transformers()}"
        )
    family.adapter_class().check(transformer)


class Patch:
    """Everything `apply_cat` changed, so `remove_cat` can undo it."""

    def __init__(self, transformer, config: CATConfig):
        self.config = config
        self.family = family_of(transformer)
        adapter = self.family.adapter_class()
        self.state = CATState(
            config, adapter.num_blocks(transformer), persistent=config.keeps_buffers
        )
        self.adapter = adapter(transformer, self.state)
        self.pipeline_patches = PatchSet()
        self.pipelines: list[weakref.ref] = []

    def add_pipeline(self, pipe) -> None:
        if any(ref() is pipe for ref in self.pipelines):
            return
        self.pipelines.append(weakref.ref(pipe))
        state_ref = weakref.ref(self.state)
        pipe_ref = weakref.ref(pipe)
        calls = self.adapter.calls_per_step

        def run(kwargs: dict):
            """A bar with a `total` is one denoising loop: one CAT run; each bar update ends
            a step."""
            state, total = state_ref(), kwargs.get("total")
            if state is None or total is None:
                return None
            # None where the pipeline does not say (PixArt decides CFG inside its call): the
            # adapter then tells from the run's first call
            pipe = pipe_ref()
            cfg = getattr(pipe, "do_classifier_free_guidance", None)
            cfg = None if cfg is None else bool(cfg)
            info = run_info(pipe, total, cfg) if state.config.budgeted else None

            def begin():
                state.begin_run(total, cfg_rows=cfg, calls_per_step=calls, run_info=info)

            return begin, state.end_run, state.end_step

        wrap_denoising_loops(self.pipeline_patches, pipe, run)

    def remove(self) -> None:
        self.pipeline_patches.undo()
        self.adapter.remove()
        self.state.release()


def run_info(pipe: Any, total: int, cfg: bool | None) -> dict:
    """What a budgeted run plans from: the σ of the loop's `total` steps (the last total + 1
    of the scheduler's, so img2img's shortened loop gets its own) and the CFG scale."""
    info: dict = {}
    sigmas = getattr(getattr(pipe, "scheduler", None), "sigmas", None)
    if sigmas is not None and len(sigmas) >= total + 1:
        info["sigmas"] = sigmas[-(total + 1) :].detach().float().cpu().numpy()
    guidance = getattr(pipe, "guidance_scale", None) if cfg else None
    info["guidance"] = None if guidance is None else float(guidance)
    return info


def _resolve(target: Any):
    """(transformer, pipeline or None) of a pipeline or transformer; TypeError otherwise."""
    from diffusers import DiffusionPipeline

    if isinstance(target, DiffusionPipeline):
        name = type(target).__name__
        why = {p: why for f in FAMILIES for p, why in f.unsupported}.get(name)
        if why is not None:
            raise TypeError(f"CAT does not support {name}: {why}")
        if not is_supported_pipeline(target):
            raise TypeError(
                f"{name} is not a supported SD3-family, FLUX or PixArt-Σ pipeline; CAT supports "
                f"{', '.join(SUPPORTED_PIPELINES)} (or a bare transformer: "
                f"{supported_transformers()})"
            )
        transformer = getattr(target, "transformer", None)
        if transformer is None:
            raise TypeError(f"{name} has no transformer loaded; load one before apply_cat")
        return _unwrap(transformer), target
    return _unwrap(target), None


def is_supported_pipeline(pipe: Any) -> bool:
    """Whether `pipe` is (a subclass of) one of `SUPPORTED_PIPELINES`."""
    return pipeline_family(pipe) is not None


def _unwrap(module):
    return getattr(module, "_orig_mod", module)  # a torch.compile OptimizedModule


def apply_cat(target: T, config: CATConfig | None = None) -> T:
    """Patch a pipeline of a supported family (SD3, FLUX, PixArt-Σ; `SUPPORTED_PIPELINES`) or a
    bare transformer of one (`SD3Transformer2DModel`, `FluxTransformer2DModel`,
    `PixArtTransformer2DModel`) with CAT pruning.

    Returns `target`. Applying again replaces the previous config (hooks never stack). All
    checks run before anything is changed: on error the target is untouched.
    """
    config = CATConfig() if config is None else config
    if not isinstance(config, CATConfig):
        raise TypeError(f"config must be a CATConfig, got {type(config).__name__}")
    transformer, pipe = _resolve(target)
    check_transformer(transformer)
    if config.anchors and not family_of(transformer).adapter_class().anchor_steps:
        raise NotImplementedError(
            f"CATConfig.anchors={config.anchors}: anchor steps are implemented for SD3-family "
            f"transformers only, not {type(transformer).__name__}; use anchors=0"
        )
    calibration = None
    if config.budgeted:  # read before anything changes: a bad file leaves the target as it was
        from . import calibration as calibrations

        calibration = calibrations.find(config.calibration, pipe, transformer)

    patch: Patch | None = getattr(transformer, _ATTRIBUTE, None)
    pipes = [] if patch is None else [ref() for ref in patch.pipelines if ref() is not None]
    if patch is not None:
        patch.remove()
        del transformer.__dict__[_ATTRIBUTE]
    patch = Patch(transformer, config)
    if calibration is not None:
        patch.state.steps.calibration = calibration
    patch.adapter.install()
    for other in [*pipes, pipe]:
        if other is not None:
            patch.add_pipeline(other)
    transformer.__dict__[_ATTRIBUTE] = patch
    return target


def remove_cat(target: T) -> T:
    """Undo `apply_cat` exactly (also for every pipeline sharing the transformer); no-op if
    `target` is not patched. Returns `target`."""
    transformer, _ = _resolve(target)
    patch = get_patch(transformer)
    if patch is not None:
        patch.remove()
        del transformer.__dict__[_ATTRIBUTE]
    return target


def get_patch(target: Any) -> Patch | None:
    """The CAT patch of a pipeline or transformer, or None."""
    from diffusers import DiffusionPipeline

    if isinstance(target, DiffusionPipeline):
        target = getattr(target, "transformer", None)
    return getattr(_unwrap(target), "__dict__", {}).get(_ATTRIBUTE)


def is_patched(target: Any) -> bool:
    return get_patch(target) is not None


@contextlib.contextmanager
def cat_generation(
    target: Any,
    num_inference_steps: int | None = None,
    cfg: bool = False,
    calls_per_step: int = 1,
    sigmas: Any = None,
    guidance_scale: float | None = None,
) -> Iterator[None]:
    """One generation of your own denoising loop with a CAT-patched transformer.

    Every transformer call inside is one step (a call with `skip_layers=` is not; with
    `calls_per_step=n`, every n calls); caches are freed on exit. Pipelines do this themselves.
    `num_inference_steps`, when given, lets a run no longer than the warm-up skip the cache
    recording. `cfg=True` says that each call's batch
    is a classifier-free-guidance pair, unconditional rows first then conditional (as diffusers
    pipelines stack it): with `cfg_selection="shared"` the conditional rows then choose the
    tokens for both, which costs less and is what pipelines do. `calls_per_step=2` (FLUX only):
    each step calls the transformer twice (true CFG as separate calls, conditional first): the
    second call computes the tokens the first one chose, on caches of its own.
    With `CATConfig(macs=...)`, `sigmas` (num_inference_steps + 1 values, e.g. your
    scheduler's `sigmas`) and `guidance_scale` (with `cfg=True`) are what the plan is made
    for; without `sigmas` the planner assumes SD3's flow-matching schedule (shift 3).
    """
    patch = get_patch(target)
    if patch is None:
        raise ValueError("cat_generation needs a CAT-patched model: call apply_cat first")
    if type(calls_per_step) is not int or calls_per_step < 1:
        raise ValueError(f"calls_per_step={calls_per_step!r}: must be an int >= 1")
    if calls_per_step > 1 and not patch.adapter.lean_followers:
        # Only FLUX's adapter runs a step's later calls on the first call's tokens (tested);
        # elsewhere the second call would select tokens of its own.
        raise NotImplementedError(
            f"calls_per_step={calls_per_step} is supported on FLUX transformers only; for "
            f"{type(patch.adapter).__name__} pass a CFG pair as one batch (unconditional rows "
            f"first) with cat_generation(..., cfg=True), as its pipelines do"
        )
    info = None
    if patch.config.budgeted:
        info = {"guidance": float(guidance_scale) if cfg and guidance_scale else None}
        if sigmas is not None:
            info["sigmas"] = np.asarray(
                sigmas.detach().float().cpu() if hasattr(sigmas, "detach") else sigmas, float
            )
    patch.state.begin_run(
        num_inference_steps, cfg_rows=cfg, calls_per_step=calls_per_step, run_info=info
    )
    try:
        yield
    finally:
        patch.state.end_run()
