"""Every model catpatch ships or builds, loaded one way, offline:

    from catpatch import models
    pipe = models.load_pipeline("scenes")
    image = pipe("a red house and a green tree at dusk", **models.call_kwargs("scenes")).images[0]

`models.names()` lists the names:
- `toy`, `scenes`: small SD3 pipelines trained for catpatch and shipped inside it
  (`catpatch.toy`, `catpatch.scenes`; their evaluation sets and detectors: `catpatch.trained`);
- `tiny-sd3`, `tiny-sd3.5-medium`, `tiny-sd3.5-large`, `tiny-flux`, `tiny-flux-dev`,
  `tiny-pixart-sigma`: complete diffusers pipelines of those families with seeded random
  weights, built from small configs (`tiny`; noise, not images: for tests and plumbing).

`call_kwargs(name)` are the settings a call needs (size, steps, guidance and, for the trained
models, the `max_sequence_length` they were trained at: the pipeline's default gives other
images). Also here: the builders behind the tiny names (`tiny`) and the named random-weight
transformer shapes of `catpatch bench` (`shapes`).
"""

from __future__ import annotations

from typing import Any

TRAINED = ("toy", "scenes")
TINY_SIZE = 128  # px: the tiny shapes' sample size times their 4x VAE
TINY_STEPS = 10


def names() -> tuple[str, ...]:
    """The names `load_pipeline` takes: the trained models, then the tiny shapes."""
    from .shapes import SHAPES

    return TRAINED + tuple(sorted(name for name in SHAPES if name.startswith("tiny-")))


def _check(name: str) -> None:
    if name not in names():
        raise ValueError(f"no model {name!r}; use one of: {', '.join(names())}")


def load_pipeline(name: str, device: Any = None, seed: int = 0) -> Any:
    """The pipeline called `name` (see `names()`), offline, float32, progress bars off, on
    `device` (default: where it was built, the CPU). `seed` seeds a tiny pipeline's random
    weights (the trained ones have theirs)."""
    _check(name)
    if name in TRAINED:
        from .. import trained

        return trained.get(name).load_pipeline(device=device)
    from .tiny import build_pipeline

    pipe = build_pipeline(name, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def call_kwargs(name: str) -> dict[str, Any]:
    """The pipeline call settings of the model called `name`; pass them with the prompt."""
    _check(name)
    if name in TRAINED:
        from .. import trained

        return dict(trained.get(name).call_kwargs)
    kwargs: dict[str, Any] = dict(height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=TINY_STEPS)
    if "pixart" in name:
        kwargs["clean_caption"] = False  # its cleaning needs bs4 and ftfy, and says so each call
    return kwargs


__all__ = ["TRAINED", "call_kwargs", "load_pipeline", "names"]
