"""Pruning policies: which tokens a pruned step computes, and which steps run the model.

Each policy is one module of plain tensor code behind the interface of `base.py`; the registry
below maps `CATConfig.selection` to a (token policy, step policy) pair. To add a policy, write
one module here and add one line to `REGISTRY`.
"""

from __future__ import annotations

from .base import StepPolicy, TokenPolicy
from .cat import CatPolicy
from .noise import NoisePolicy
from .paper import PaperPolicy
from .random import RandomPolicy
from .stale import StalePolicy
from .step_reuse import PrunedStepReuse, StepReuse

# selection name -> (token policy or None: no token pruning, step policy)
REGISTRY: dict[str, tuple[type[TokenPolicy] | None, type[StepPolicy]]] = {
    "cat": (CatPolicy, StepPolicy),
    "paper": (PaperPolicy, StepPolicy),
    "random": (RandomPolicy, StepPolicy),
    "noise": (NoisePolicy, StepPolicy),
    "stale": (StalePolicy, StepPolicy),
    "step": (None, StepReuse),
    "cat+reuse": (CatPolicy, PrunedStepReuse),
}


def build(config, persistent: bool = False) -> tuple[TokenPolicy | None, StepPolicy]:
    """The token and step policies of `config.selection`."""
    token_cls, step_cls = REGISTRY[config.selection]
    token = None if token_cls is None else token_cls(config, persistent)
    return token, step_cls(config)


__all__ = ["REGISTRY", "StepPolicy", "TokenPolicy", "build"]
