"""catpatch: compute less at the late denoising steps of SD3-family, FLUX.1 and PixArt-Σ
pipelines: a planned MACs budget (step reuse with fitted forecasts), step reuse, or CAT pruning
(cluster-aware token pruning with feature caching).

from catpatch import CATConfig, apply_cat, remove_cat, cat_stats
apply_cat(pipe, CATConfig(macs=0.4))  # at most 40% of the transformer's MACs
image = pipe(prompt, num_inference_steps=28).images[0]
print(cat_stats(pipe).summary())
remove_cat(pipe)
"""

from __future__ import annotations

from typing import Any

from .calibration import Calibration, calibrate
from .config import CATConfig
from .patching import apply_cat, cat_generation, is_patched, remove_cat
from .stats import CATStats

__version__ = "0.5.0"
__all__ = [
    "CATConfig",
    "Calibration",
    "calibrate",
    "CATStats",
    "apply_cat",
    "remove_cat",
    "cat_stats",
    "cat_generation",
    "is_patched",
]


def cat_stats(target: Any) -> CATStats:
    """What the last generation of a CAT-patched pipeline or transformer did.

    Steps, pruned steps, S and L, the fraction of image tokens computed, and the MACs of the
    run against the same run unpatched (see `catpatch.stats`).
    """
    from .patching import _resolve, get_patch
    from .stats import collect

    transformer, _ = _resolve(target)
    patch = get_patch(transformer)
    if patch is None:
        raise ValueError("cat_stats needs a CAT-patched model: call apply_cat first")
    return collect(patch, transformer)
