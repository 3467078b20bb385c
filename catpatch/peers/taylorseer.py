"""diffusers' own TaylorSeerCache on an SD3 pipeline: the peer catpatch's study measures against.

diffusers ships `apply_taylorseer_cache` (TaylorSeer, arXiv 2503.06923: hooked modules run on
every `cache_interval`-th step after a warm-up and are forecast by a Taylor series in the step
index in between), but the SD3 pipelines set no cache context, so a hooked SD3 transformer
raises "No cache context is set", and nothing resets the hooks' state between generations.
`apply_taylorseer` supplies both for one pipeline — the context for every call of a
generation, a reset at its start — through the same reversible patches as `apply_cat`.

Two settings: diffusers' default hooks every joint attention (`transformer_blocks.N.attn`: its
projections and attention are forecast; norms and FFNs still run); `lite=True` is diffusers'
lite mode — every block skipped (zeros), the output projection forecast: whole steps forecast —
with the last block skipped module by module, because diffusers' lite mode fails on SD3's last
block (it returns no text states: `None` has no dtype). `catpatch.stats.measured_macs` measures
the MACs of such a run with torch's FLOP counter, which agrees with the cost model of ours
(tests/test_stats.py, tests/test_taylorseer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hooks import PatchSet, wrap_denoising_loops
from .hooks import registry_of

_PATCHES = "_catpatch_taylorseer"


@dataclass(frozen=True)
class TaylorSeer:
    """Settings of diffusers' TaylorSeerCache as the study runs it.

    cache_interval: hooked modules run on every n-th step after the warm-up and are forecast
    in between; warmup_steps: diffusers' `disable_cache_before_step` (full steps first);
    max_order: order of the Taylor series; lite: forecast whole steps (see the module doc)."""

    cache_interval: int = 3
    warmup_steps: int = 3
    max_order: int = 1
    lite: bool = False


def apply_taylorseer(pipe: Any, settings: TaylorSeer = TaylorSeer()) -> None:
    """Hook diffusers' TaylorSeerCache into `pipe.transformer` and make the SD3 pipeline run
    it; `remove_taylorseer(pipe)` undoes both. Factors are kept in float32 (diffusers' default
    bfloat16 would add rounding that is not TaylorSeer's)."""
    import torch
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    if hasattr(pipe, _PATCHES):
        raise ValueError("TaylorSeer is already applied to this pipeline; remove_taylorseer first")
    transformer = pipe.transformer
    modules = {}
    if settings.lite:
        last = len(transformer.transformer_blocks) - 1
        modules = dict(
            skip_predict_identifiers=[
                rf"transformer_blocks\.(?!{last}$)\d+",
                rf"transformer_blocks\.{last}\.(norm1|norm1_context|attn|attn2|ff)",
            ],
            cache_identifiers=["proj_out"],
        )
    config = TaylorSeerCacheConfig(
        cache_interval=settings.cache_interval,
        disable_cache_before_step=settings.warmup_steps,
        max_order=settings.max_order,
        taylor_factors_dtype=torch.float32,
        **modules,
    )
    apply_taylorseer_cache(transformer, config)
    registry_of(transformer).invalidate_child_registries_cache()  # it lists hooked modules
    patches = PatchSet()
    wrap_denoising_loops(patches, pipe, lambda kwargs: _generation(transformer))
    setattr(pipe, _PATCHES, patches)


def remove_taylorseer(pipe: Any) -> None:
    """Undo `apply_taylorseer`: the pipeline patch and every TaylorSeer hook."""
    patches = vars(pipe).pop(_PATCHES, None)
    if patches is None:
        return
    patches.undo()
    registry = registry_of(pipe.transformer)
    registry.remove_hook("taylorseer_cache")
    registry.invalidate_child_registries_cache()


def _generation(transformer):
    """(enter, exit) of one TaylorSeer generation: fresh hook state and a cache context while
    the denoising loop runs."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    def enter() -> None:
        registry_of(transformer).reset_stateful_hooks()
        _set_cache_context(transformer, CacheContext("cond"))  # one batched call per step

    return enter, lambda: _set_cache_context(transformer, None)
