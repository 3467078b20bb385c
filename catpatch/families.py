"""Model families: which adapter serves which diffusers transformer, and which pipelines.

One entry per family; the adapter package (`sd3/`, `flux/`, `pixart/`) holds everything that
knows the family's layout. An adapter class is built as `Adapter(transformer, state)` and
provides `check(transformer)` (static: `TypeError` naming the fix if CAT cannot serve it as set
up now), `num_blocks(transformer)` (static), `calls_per_step` (transformer calls per step in the
family's pipelines; None: as many as come before the progress bar advances, e.g. FLUX's true CFG
as two calls), `install()`, `remove()`, `cost_model()` (a `stats.CostModel`) and
`step_macs(tokens, text, computed=None, lean=False)` (its cost model's, one call and one batch
row), `text_tokens` (what the family's pipelines pass) and `example_conditioning(...)` (random
text inputs of a call, for the census and benchmarks). Adapters are imported on use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    transformer: str  # the diffusers transformer class name
    adapter: str  # "module:Class"
    pipelines: tuple[str, ...]  # pipeline class names CAT supports (subclasses too)
    unsupported: tuple[tuple[str, str], ...] = ()  # (pipeline class, why not)

    def adapter_class(self) -> type:
        module, name = self.adapter.split(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: tuple[Family, ...] = (
    Family(
        "SD3",
        "SD3Transformer2DModel",
        "catpatch.sd3:SD3Adapter",
        (
            "StableDiffusion3Pipeline",
            "StableDiffusion3Img2ImgPipeline",
            "StableDiffusion3InpaintPipeline",
            "StableDiffusion3ControlNetPipeline",
            "StableDiffusion3ControlNetInpaintingPipeline",
        ),
    ),
    Family(
        "FLUX",
        "FluxTransformer2DModel",
        "catpatch.flux:FluxAdapter",
        (
            "FluxPipeline",
            "FluxImg2ImgPipeline",
            "FluxInpaintPipeline",
            "FluxControlNetPipeline",
            "FluxFillPipeline",
            "FluxControlPipeline",
        ),
        unsupported=(
            (
                "FluxKontextPipeline",
                "it appends the reference image's tokens to the image sequence (extra position "
                "ids, output cut to the first tokens), which CAT's token grid does not model",
            ),
            (
                "FluxKontextInpaintPipeline",
                "it appends the reference image's tokens to the image sequence, which CAT's "
                "token grid does not model",
            ),
        ),
    ),
    Family(
        "PixArt-Σ",
        "PixArtTransformer2DModel",
        "catpatch.pixart:PixArtAdapter",
        ("PixArtSigmaPipeline",),
        unsupported=(
            (
                "PixArtSigmaPAGPipeline",
                "perturbed-attention guidance adds a third batch row whose self-attention "
                "processor CAT's pruned block does not reproduce",
            ),
        ),
    ),
)


def _names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def family_of(transformer: Any) -> Family | None:
    """The family of a transformer (by class, subclasses included), or None."""
    names = _names(transformer)
    return next((f for f in FAMILIES if f.transformer in names), None)


def pipeline_family(pipe: Any) -> Family | None:
    """The family whose supported pipelines include `pipe`'s class (or a base), or None."""
    names = _names(pipe)
    return next((f for f in FAMILIES if names & set(f.pipelines)), None)


def supported_transformers() -> str:
    return ", ".join(f"{f.transformer} ({f.name})" for f in FAMILIES)
