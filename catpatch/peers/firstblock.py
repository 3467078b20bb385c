"""diffusers' FirstBlockCache on an SD3 pipeline: a step-skipping peer catpatch's study measures.

diffusers' `apply_first_block_cache` (ParaAttention's First Block Cache): the first block runs
every step; while its residual (output - input) differs from the last computed step's by under
`threshold` (mean |Δ| / mean |previous|), the other blocks are skipped and the residual they
added on the last computed step is added instead. On SD3 pipelines as shipped it does not run:

- The pipelines set no cache context ("No cache context is set") nor reset hook state between
  generations: `apply_firstblock` does both for each generation, as `apply_taylorseer` does.
- SD3's last block (`context_pre_only`) returns `(None, hidden_states)`; FBC's tail hook takes
  the residual of both: `None - Tensor`. `apply_firstblock` wraps that block's `forward`, below
  FBC's hooks, to return its input text states in the `None` slot: the output is unchanged, as
  `SD3Transformer2DModel.forward` reads only the image states after the last block.

`catpatch.stats.measured_macs` measures a run's MACs (a skipped step runs the embeddings, first
block and output layers); `firstblock_skipped_steps` lists the skipped steps. The decision is one
number per call: under classifier-free guidance, of the batched [uncond, cond] residual jointly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..hooks import wrap_denoising_loops
from .hooks import CacheRecord, registry_of, remove_cache_hooks, skipped_steps, start_record, watch

_PATCHES = "_catpatch_firstblock"
# diffusers' hook names (diffusers/hooks/first_block_cache.py)
_HEAD_HOOK = "fbc_leader_block_hook"
_BLOCK_HOOK = "fbc_block_hook"


@dataclass(frozen=True)
class FirstBlockCache:
    """Settings of diffusers' FirstBlockCache (default is diffusers'). threshold: relative
    change of the first block's residual under which a step's remaining blocks are skipped;
    0 skips nothing, higher skips more (faster, further from the unpatched image)."""

    threshold: float = 0.05

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (0 skips nothing), got {self.threshold}")


def apply_firstblock(pipe: Any, settings: FirstBlockCache = FirstBlockCache()) -> None:
    """Hook diffusers' FirstBlockCache into `pipe.transformer`, run on SD3 (see the module doc)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    if hasattr(pipe, _PATCHES):
        raise ValueError("FirstBlockCache is already applied to this pipeline; remove it first")
    transformer = pipe.transformer
    blocks = transformer.transformer_blocks
    if len(blocks) < 2:
        raise ValueError(f"FirstBlockCache needs at least 2 transformer blocks, got {len(blocks)}")
    record = start_record(transformer)
    # before FBC's hooks: they wrap whatever `forward` the instance has, so this one sits below
    record.patches.set_attribute(blocks[-1], "forward", _with_text_states(blocks[-1].forward))
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=settings.threshold))
    registry_of(transformer).invalidate_child_registries_cache()  # it lists hooked modules
    refusal = (
        "FirstBlockCache cannot run with skip-layer guidance (a second call per step, "
        "another batch); call the pipeline without skip_guidance_layers"
    )
    watch(record, transformer, _HEAD_HOOK, refusal)
    wrap_denoising_loops(record.patches, pipe, lambda kwargs: _generation(transformer, record))
    setattr(pipe, _PATCHES, record)


def remove_firstblock(pipe: Any) -> None:
    """Undo `apply_firstblock`: its hooks, wrapper, patches and the hook registries it made."""
    record = vars(pipe).pop(_PATCHES, None)
    if record is None:
        return
    # puts back the forward the hooks wrapped: the last block's wrapper
    remove_cache_hooks(pipe.transformer, (_HEAD_HOOK, _BLOCK_HOOK), record)
    record.patches.undo()  # after the hooks: restores the last block's own `forward`


def firstblock_skipped_steps(pipe: Any) -> list[int]:
    """Indices of the steps whose remaining blocks were skipped in the last generation."""
    return skipped_steps(pipe, _PATCHES, "FirstBlockCache")


def _with_text_states(forward: Any) -> Any:
    """`forward` of a joint block, returning its input text states where it returns none."""

    def text_states_kept(*args: Any, **kwargs: Any) -> Any:
        text, hidden = forward(*args, **kwargs)
        if text is None:
            text = kwargs["encoder_hidden_states"] if len(args) < 2 else args[1]
        return text, hidden

    return text_states_kept


def _generation(transformer: Any, record: CacheRecord):
    """(enter, exit) of one generation: fresh hook state, a cache context while it runs."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    def enter() -> None:
        registry_of(transformer).reset_stateful_hooks()
        _set_cache_context(transformer, CacheContext("cond"))  # one batched call per step
        record.skipped, record.steps = [], 0

    return enter, lambda: _set_cache_context(transformer, None)
