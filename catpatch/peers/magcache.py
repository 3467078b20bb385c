"""diffusers' own MagCache on an SD3 pipeline: a step-skipping peer catpatch's study measures.

diffusers ships `apply_mag_cache` (MagCache, arXiv 2506.09045): on each step after a warm-up
(`retention_ratio` of the steps) it multiplies per-step magnitude ratios ‖r_t‖/‖r_{t-1}‖ of the
blocks' residual r = output - input of the whole block stack, and while the accumulated error
Σ|1 - Π ratio| stays under `threshold` (at most `max_skip_steps` in a row) it skips every block
and adds the last computed residual instead. The ratios depend on the checkpoint and the step
count: its docs say to run inference once with `MagCacheConfig(calibrate=True)`, which prints
them, and pass them back as `mag_ratios`.

On SD3 pipelines as shipped it runs (`JointTransformerBlock` is in diffusers' block registry,
its hooks set their own cache context, and SD3's last block, which returns `(None, hidden)`, is
read at the hidden-states index; on skipped steps it returns the input text states in the
`None` slot, which the SD3 transformer discards). What goes wrong, and what this module does:

- Hook state outlives a generation: diffusers resets it only when the step counter reaches
  `num_inference_steps`. A generation with another step count (or an interrupted one) leaves
  the next one starting mid-schedule: it skips steps inside its warm-up with a residual of
  another image. `apply_magcache` resets the state at each generation's start and refuses a
  denoising loop whose step count is not the calibrated one.
- Skip-layer guidance (SD3.5) calls the transformer a second time per step with another batch:
  the step counter runs twice as fast and the cached residual does not fit (diffusers warns and
  returns the blocks' input unchanged). `apply_magcache` raises on such a call.
- Calibration only prints the ratios: `calibrate_magcache` runs diffusers' calibration on the
  pipeline and returns them.

`catpatch.stats.measured_macs` measures the MACs of a run (a skipped step still runs the patch
and time embeddings and the output layers); `magcache_skipped_steps` lists what was skipped.
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..hooks import wrap_denoising_loops
from .hooks import CacheRecord, registry_of, remove_cache_hooks, skipped_steps, start_record, watch

_PATCHES = "_catpatch_magcache"
# diffusers' hook names (diffusers/hooks/mag_cache.py)
_HEAD_HOOK = "mag_cache_leader_block_hook"
_BLOCK_HOOK = "mag_cache_block_hook"
_CALIBRATION_BANNER = "[MagCache] Calibration Complete"


@dataclass(frozen=True)
class MagCache:
    """Settings of diffusers' MagCache as the study runs it (defaults are diffusers').

    threshold: accumulated magnitude error under which a step's blocks are skipped; 0 skips
    nothing, higher skips more (faster, further from the unpatched image).
    max_skip_steps: most steps skipped in a row.
    retention_ratio: the first `round(retention_ratio * num_inference_steps)` steps always run.
    num_inference_steps: the step count the ratios are for; other loops are refused.
    mag_ratios: one ratio per step from `calibrate_magcache` (diffusers interpolates a list of
    another length to `num_inference_steps`)."""

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int = 28
    mag_ratios: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mag_ratios is not None:
            object.__setattr__(self, "mag_ratios", tuple(float(r) for r in self.mag_ratios))
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (0 skips nothing), got {self.threshold}")
        if self.max_skip_steps < 0:
            raise ValueError(f"max_skip_steps must be >= 0, got {self.max_skip_steps}")
        if not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"retention_ratio must be in [0, 1], got {self.retention_ratio}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")


def calibrate_magcache(
    pipe: Any, prompts: str | Sequence[str], num_inference_steps: int = 28, **call_kwargs: Any
) -> list[float]:
    """MagCache's magnitude ratios for `pipe`'s transformer at `num_inference_steps`, as its
    docs say: one pipeline call on `prompts` (a batch: ratios are means over its images and
    tokens) with `MagCacheConfig(calibrate=True)`, which skips nothing. `call_kwargs` go to the
    pipeline (e.g. `generator=`, `guidance_scale=`); the images are not decoded."""
    from diffusers.hooks import MagCacheConfig

    config = MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps)
    _apply(pipe, config)
    printed = io.StringIO()  # diffusers prints the ratios: read them instead of showing them
    prompt = prompts if isinstance(prompts, str) else list(prompts)
    call_kwargs.setdefault("output_type", "latent")
    try:
        with contextlib.redirect_stdout(printed):
            pipe(prompt=prompt, num_inference_steps=num_inference_steps, **call_kwargs)
    finally:
        remove_magcache(pipe)
    return _printed_ratios(printed.getvalue())


def apply_magcache(pipe: Any, settings: MagCache) -> None:
    """Hook diffusers' MagCache into `pipe.transformer` and make the SD3 pipeline run it (see
    the module doc); `remove_magcache(pipe)` undoes both."""
    from diffusers.hooks import MagCacheConfig

    if settings.mag_ratios is None:
        raise ValueError(
            "MagCache needs magnitude ratios calibrated for this model and step count: "
            "MagCache(mag_ratios=calibrate_magcache(pipe, prompts, num_inference_steps), ...)"
        )
    config = MagCacheConfig(
        threshold=settings.threshold,
        max_skip_steps=settings.max_skip_steps,
        retention_ratio=settings.retention_ratio,
        num_inference_steps=settings.num_inference_steps,
        mag_ratios=list(settings.mag_ratios),
    )
    _apply(pipe, config)


def remove_magcache(pipe: Any) -> None:
    """Undo `apply_magcache` (or a calibration): the pipeline patches and every MagCache hook;
    hook registries that MagCache created are deleted with them."""
    record = vars(pipe).pop(_PATCHES, None)
    if record is None:
        return
    record.patches.undo()
    remove_cache_hooks(pipe.transformer, (_HEAD_HOOK, _BLOCK_HOOK), record)


def magcache_skipped_steps(pipe: Any) -> list[int]:
    """Indices of the steps whose blocks MagCache skipped in the pipeline's last generation."""
    return skipped_steps(pipe, _PATCHES, "MagCache")


def _apply(pipe: Any, config: Any) -> None:
    from diffusers.hooks import apply_mag_cache

    if hasattr(pipe, _PATCHES):
        raise ValueError("MagCache is already applied to this pipeline; remove_magcache first")
    transformer = pipe.transformer
    record = start_record(transformer)
    apply_mag_cache(transformer, config)
    registry_of(transformer).invalidate_child_registries_cache()  # it lists hooked modules
    refusal = (
        "MagCache cannot run with skip-layer guidance: its second transformer call per "
        "step advances MagCache's step counter and has another batch than the cached "
        "residual; call the pipeline without skip_guidance_layers"
    )
    watch(record, transformer, _HEAD_HOOK, refusal)
    wrap_denoising_loops(
        record.patches, pipe, lambda kwargs: _generation(transformer, config, record, kwargs)
    )
    setattr(pipe, _PATCHES, record)


def _generation(
    transformer: Any, config: Any, record: CacheRecord, bar_kwargs: dict
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(enter, exit) of one MagCache generation: fresh hook state, after checking that the
    denoising loop has the step count the ratios are for."""
    total = bar_kwargs.get("total")
    if total is not None and total != config.num_inference_steps:
        raise ValueError(
            f"MagCache is set for {config.num_inference_steps} denoising steps but this loop "
            f"has {total}: its ratios and step counter are per step; calibrate and apply "
            f"MagCache(num_inference_steps={total}, ...)"
        )

    def enter() -> None:
        # MagCache's hooks set their own cache context once the reset has cleared it
        registry_of(transformer).reset_stateful_hooks()
        record.skipped, record.steps = [], 0

    return enter, lambda: None


def _printed_ratios(text: str) -> list[float]:
    """The ratio list diffusers prints after its banner at the end of a calibration run."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(_CALIBRATION_BANNER):
            values = next((s for s in lines[i + 1 :] if s.startswith("[")), None)
            if values is not None:
                return [float(v) for v in ast.literal_eval(values)]
    raise RuntimeError(
        "diffusers printed no MagCache calibration ratios: did the denoising loop run all "
        f"its steps? Output was: {text[-500:]!r}"
    )
