"""Pruning policies: which tokens a pruned step computes, and which steps run the model.

Each policy is one module of plain tensor code behind the interface of `base.py`; `REGISTRY`
maps `CATConfig.selection` to a (token policy, step policy) pair. To add a policy, write one
module here and add one line to `REGISTRY`, or call `register` from your own code: `CATConfig`
reads the registry when it validates, so a name registered at any time is accepted.
"""

from __future__ import annotations

from .anchors import AnchorPolicy
from .base import StepPolicy, TokenPolicy
from .cat import CatPolicy
from .noise import NoisePolicy
from .paper import PaperPolicy
from .planned import PlannedSteps
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


def register(
    name: str,
    token_policy: type[TokenPolicy] | None,
    step_policy: type[StepPolicy] = StepPolicy,
    replace: bool = False,
) -> None:
    """Make `name` a value of `CATConfig.selection`: its pruned steps choose tokens with
    `token_policy` (None: no token pruning) and `step_policy` decides which steps run the
    model. Refuses to redefine a registered name unless `replace`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty str, got {name!r}")
    if name in REGISTRY and not replace:
        raise ValueError(f"selection {name!r} is already registered; pass replace=True")
    if token_policy is not None and not (
        isinstance(token_policy, type) and issubclass(token_policy, TokenPolicy)
    ):
        raise TypeError(f"token_policy must be a TokenPolicy subclass or None: {token_policy!r}")
    if not (isinstance(step_policy, type) and issubclass(step_policy, StepPolicy)):
        raise TypeError(f"step_policy must be a StepPolicy subclass: {step_policy!r}")
    REGISTRY[name] = (token_policy, step_policy)


# What pictures and messages call a selection (a registered name without one shows as itself).
LABELS = {
    "step": "step reuse",
    "cat": "CAT",
    "paper": "CAT (reference rules)",
    "cat+reuse": "CAT + step reuse",
    "stale": "round robin",
    "random": "random tokens",
    "noise": "largest drift",
}


def label(selection: str) -> str:
    """A selection's name in pictures and messages: "step reuse", "CAT", ..."""
    return LABELS.get(selection, f"selection {selection!r}")


def policy_label(config) -> str:
    """What a config runs, in words: "planned steps (MACs 0.4)", "step reuse", "CAT", ..."""
    if config.budgeted:
        anchors = f", {config.anchors} anchors per cluster" if config.anchors else ""
        return f"planned steps (MACs {config.macs:g}{anchors})"
    return label(config.selection)


def names() -> tuple[str, ...]:
    """The registered selection names, in registration order."""
    return tuple(REGISTRY)


def build(config, persistent: bool = False) -> tuple[TokenPolicy | None, StepPolicy]:
    """The token and step policies of `config.selection` (of the budget, with `macs`)."""
    if config.budgeted:
        anchors = AnchorPolicy(config, persistent) if config.anchors else None
        return anchors, PlannedSteps(config)
    token_cls, step_cls = REGISTRY[config.selection]
    token = None if token_cls is None else token_cls(config, persistent)
    return token, step_cls(config)


__all__ = ["REGISTRY", "StepPolicy", "TokenPolicy", "build", "names", "register"]
