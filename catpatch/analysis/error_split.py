"""Where CAT's error comes from: CAT with the full model as an oracle at every pruned step.

At a pruned step CAT's output differs from the full model's for three reasons:

- (a) **stale outputs**: unselected tokens return their last computed output;
- (b) **stale K/V**: the selected tokens (and the text tokens) attend to the K/V of the
  unselected tokens cached at the step those were last computed;
- (c) **estimated drift**: the next selection reads the dense estimate (cached attention / FFN
  outputs of the unselected tokens on the current residual stream) instead of the true output.

`error_split(pipe, config, Oracle(...))` applies CAT and, before each pruned step, runs the
same transformer call in full (the recording step's block code, every token computed, with the
cache writes diverted so CAT's caches are not touched): the oracle pass, which gives the true
output y* of every token and the true K/V of every block. An `Oracle` then removes sources one
at a time:

- `fresh_kv`: every block's K/V cache (image and text rows, also the second attention's) takes
  the oracle's K/V before the pruned pass, so the selected tokens are computed exactly; the
  attention / FFN output caches, which the dense estimate reads, stay CAT's. Removes (b).
- `fresh_outputs`: unselected tokens give their true output y* instead of their last one (also
  kept as their last output); the selected tokens are computed as CAT does, against stale
  K/V. Removes (a).
- `true_drift`: the token policy's next selection reads y* instead of the estimate. Removes (c).

With `fresh_kv` and `fresh_outputs` every token's output is the true one, and the run equals
the unpatched one up to float error whatever the selection; with no oracle the run equals
plain CAT exactly (the oracle pass leaves no trace). Each pruned step's error against y* is
logged (`SplitLog`): the squared error of the selected and of the unselected tokens (disjoint,
so they add up to the step's) and the error of what the policy read. Eager runs of exact CAT
only (no `compile`, no `lean`, no skipped steps, no ControlNet). A measuring tool: CAT's own
code path is unchanged and the patch is removed on exit.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..caches import gather_tokens, write_rows
from ..config import CATConfig
from ..hooks import PatchSet
from ..patching import Patch, apply_cat, get_patch, remove_cat
from ..schedule import Mode

KV_FIELDS = ("kv", "key2", "value2")  # the `BlockCache` fields attention reads


@dataclass(frozen=True)
class Oracle:
    """Which of CAT's error sources the oracle removes (see the module docstring)."""

    fresh_kv: bool = False  # removes (b) stale K/V
    fresh_outputs: bool = False  # removes (a) stale outputs
    true_drift: bool = False  # removes (c) estimated drift

    @property
    def name(self) -> str:
        parts = [
            label
            for flag, label in (
                (self.fresh_kv, "fresh K/V"),
                (self.fresh_outputs, "fresh outputs"),
                (self.true_drift, "true drift"),
            )
            if flag
        ]
        return " + ".join(parts) or "cat"

    @property
    def remaining(self) -> str:
        """The error sources left: a stale outputs, b stale K/V, c estimated drift."""
        left = [s for s, removed in zip("abc", self.flags(), strict=True) if not removed]
        return "".join(left) or "-"

    def flags(self) -> tuple[bool, bool, bool]:
        """(fresh outputs, fresh K/V, true drift): removes (a), (b), (c)."""
        return self.fresh_outputs, self.fresh_kv, self.true_drift


# Plain CAT, one source removed, two removed, all three (the last two equal unpatched).
VARIANTS: tuple[Oracle, ...] = (
    Oracle(),
    Oracle(fresh_outputs=True),
    Oracle(fresh_kv=True),
    Oracle(true_drift=True),
    Oracle(fresh_kv=True, true_drift=True),
    Oracle(fresh_outputs=True, true_drift=True),
    Oracle(fresh_kv=True, fresh_outputs=True),
    Oracle(fresh_kv=True, fresh_outputs=True, true_drift=True),
)


@dataclass
class StepError:
    """One pruned call against its oracle: squared L2 norms summed over batch rows."""

    step: int
    selected: float  # ||y - y*||² over the computed tokens
    unselected: float  # ||y - y*||² over the others
    reference: float  # ||y*||²
    drift_input: float  # ||what the policy read - y*||² over the driver rows
    drift_reference: float  # ||y*||² over the driver rows


@dataclass
class SplitLog:
    """Every pruned call of the runs inside one `error_split` block."""

    steps: list[StepError] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Relative step errors over all logged calls (root of summed squares over summed
        squares of y*): `selected`, `unselected`, `total`; `unselected_share` of the squared
        error; `drift_input`: the error of the policy's input. NaN when nothing was logged."""
        if not self.steps:
            return dict.fromkeys(
                ("selected", "unselected", "total", "unselected_share", "drift_input"), math.nan
            )
        sel = sum(s.selected for s in self.steps)
        unsel = sum(s.unselected for s in self.steps)
        ref = sum(s.reference for s in self.steps)
        drift = sum(s.drift_input for s in self.steps)
        drift_ref = sum(s.drift_reference for s in self.steps)
        return {
            "selected": math.sqrt(sel / ref),
            "unselected": math.sqrt(unsel / ref),
            "total": math.sqrt((sel + unsel) / ref),
            "unselected_share": unsel / (sel + unsel) if sel + unsel > 0 else math.nan,
            "drift_input": math.sqrt(drift / drift_ref),
        }

    def by_step(self) -> dict[int, float]:
        """The relative total error of each pruned step index, over all logged calls."""
        sums: dict[int, list[float]] = {}
        for s in self.steps:
            acc = sums.setdefault(s.step, [0.0, 0.0])
            acc[0] += s.selected + s.unselected
            acc[1] += s.reference
        return {step: math.sqrt(err / ref) for step, (err, ref) in sorted(sums.items())}


class ErrorSplit:
    """The oracle instrumentation of one CAT patch (installed by `error_split`)."""

    def __init__(self, patch: Patch, oracle: Oracle):
        self.patch, self.oracle = patch, oracle
        self.state, self.adapter = patch.state, patch.adapter
        self.log = SplitLog()
        self.patches = PatchSet()
        self._oracle_pass_running = False
        self._captured: Tensor | None = None  # the oracle pass's token-level output
        self._true: Tensor | None = None  # y* of the pruned call in progress
        self._drift: tuple[float, float] = (math.nan, math.nan)

    def install(self) -> None:
        transformer, p = self.adapter.transformer, self.patches
        self._original_observe = self.adapter._observe
        self._original_next = self.state.tokens.next
        self._original_keep = self.state.caches.keep
        original = transformer.forward
        forward = functools.update_wrapper(functools.partial(self._forward, original), original)
        p.set_attribute(transformer, "forward", forward)
        p.set_attribute(self.adapter, "_observe", self._observe)
        p.set_attribute(self.state.tokens, "next", self._next)
        p.set_attribute(self.state.caches, "keep", self._keep)

    def remove(self) -> None:
        self.patches.undo()

    # -- the transformer call
    def _forward(self, original, *args, **kwargs):
        if self.state.schedule.mode is not Mode.PRUNED:
            return original(*args, **kwargs)
        if kwargs.get("block_controlnet_hidden_states") is not None:
            raise NotImplementedError("error_split does not support ControlNet residuals")
        self._true = self._oracle_pass(original, args, kwargs)
        try:
            return original(*args, **kwargs)
        finally:
            self._true = None

    def _oracle_pass(self, original, args: tuple, kwargs: dict) -> Tensor:
        """Run this call in full with the recording step's block code, every cache write
        diverted to new tensors; put the caches back (with the fresh K/V if the oracle says
        so) and return the true token-level output y* (R, L, F)."""
        schedule, blocks = self.state.schedule, self.state.caches.blocks
        saved = [dict(vars(cache)) for cache in blocks]
        for cache in blocks:  # the recording code fills a cache it finds in place: hide them
            vars(cache).update(dict.fromkeys(vars(cache)))
        schedule.mode, self._oracle_pass_running = Mode.RECORD, True
        try:
            with torch.no_grad():
                original(*args, **kwargs)
            fresh = [dict(vars(cache)) for cache in blocks]
        finally:
            schedule.mode, self._oracle_pass_running = Mode.PRUNED, False
            for cache, old in zip(blocks, saved, strict=True):
                vars(cache).update(old)  # CAT's own buffers, at their addresses
        if self.oracle.fresh_kv:
            for old, new in zip(saved, fresh, strict=True):
                for name in KV_FIELDS:
                    if old[name] is not None:
                        old[name].copy_(new[name])
        true, self._captured = self._captured, None
        return true

    def _keep(self, buffer: Tensor | None, value: Tensor) -> Tensor:
        if self._oracle_pass_running:
            return value.detach()  # a new tensor: CAT's cache is left as it was
        return self._original_keep(buffer, value)

    # -- the output side
    def _observe(self, mode: Mode, output: Tensor, time: Tensor | None = None) -> Tensor | None:
        if self._oracle_pass_running:
            self._captured = output.detach().clone()
            return None  # the oracle pass's own output is not used
        if mode is not Mode.PRUNED or self._true is None:
            return self._original_observe(mode, output, time)
        true, step = self._true, self.state.step_index
        result = self._original_observe(mode, output, time)  # calls `_next`
        if self.oracle.fresh_outputs:
            merged = true.clone()
            write_rows(merged, step.image, gather_tokens(result, step.index))
            self.state.caches.previous.copy_(merged)
            result = merged
        per_token = (result - true).float().square().sum(-1)  # (R, L)
        computed = torch.zeros_like(per_token, dtype=torch.bool).scatter_(1, step.index, True)
        self.log.steps.append(
            StepError(
                self.state.schedule.step,
                float(per_token[computed].sum()),
                float(per_token[~computed].sum()),
                float(true.float().square().sum()),
                *self._drift,
            )
        )
        return result

    def _next(self, output: Tensor, computed: Tensor) -> Tensor:
        if self._true is not None:
            target = self.state.schedule.driver_rows(self._true)
            if self.oracle.true_drift:
                output = target
            self._drift = (
                float((output.float() - target.float()).square().sum()),
                float(target.float().square().sum()),
            )
        return self._original_next(output, computed)


@contextlib.contextmanager
def error_split(
    target: Any, config: CATConfig | None = None, oracle: Oracle | None = None
) -> Iterator[SplitLog]:
    """Apply CAT (`config`) to an unpatched pipeline or transformer with the oracle
    instrumentation `oracle`; yields the `SplitLog` that fills as pipelines run inside the
    block, and removes the patch on exit."""
    config = CATConfig(selection="cat") if config is None else config
    oracle = Oracle() if oracle is None else oracle
    if config.lean or config.compile is not None:
        raise ValueError("error_split measures exact, eager CAT: use lean=False, compile=None")
    if get_patch(target) is not None:
        raise ValueError("error_split applies CAT itself: call remove_cat first")
    apply_cat(target, config)
    try:
        patch = get_patch(target)
        if patch.state.tokens is None or patch.state.steps.skips:
            raise ValueError(
                f"error_split needs a token policy that runs every step, not selection="
                f"{config.selection!r}"
            )
        split = ErrorSplit(patch, oracle)
        split.install()
        try:
            yield split.log
        finally:
            split.remove()
    finally:
        remove_cat(target)


__all__ = ["VARIANTS", "ErrorSplit", "Oracle", "SplitLog", "StepError", "error_split"]
