"""The seam for pruning policies: what a token policy and a step policy implement.

A **token policy** decides which S image tokens each pruned step computes; a **step policy**
decides which steps after the warm-up run the model at all. Both are plain tensor code: they see
the model output per token (G, L, F) of the rows that drive the selection (see
`schedule.Schedule.driver_rows`) and never a diffusers object, so they are tested on hand-made
tensors. The run's state (`state.CATState`) calls them at fixed points of the schedule:

| when | token policy | step policy |
|---|---|---|
| a run's geometry is known (host side, outside compiled graphs) | `prepare` | `plan` |
| step t0-2 (full) | `observe_reference` | |
| step t0-1 (full, caches recorded) | `first` -> the first pruned step's (G, S) | |
| after each pruned step | `next` -> the next pruned step's (G, S) | |
| after each step that ran the model | | `observe` |
| a step the step policy skips | | `output` |

Per-step methods must keep static shapes and never read a tensor on the host (no `.item()`,
`.tolist()`, tensor truth tests): they run inside the pruned step's compiled graph. State tensors
go through `self.keep` so that with persistent buffers they keep their address across runs.

A new policy is one module in this package and one line in `policies/__init__.py`'s registry
(or a `policies.register` call from outside the package).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..caches import keep, static_tensor
from . import ranking

if TYPE_CHECKING:
    from ..config import CATConfig
    from ..schedule import Geometry


class TokenPolicy:
    """Chooses the S image tokens of each pruned step (one selection per group of rows)."""

    name: ClassVar[str]

    def __init__(self, config: CATConfig, persistent: bool = False):
        self.config = config
        self.persistent = persistent
        self.free()

    def keep(self, buffer: Tensor | None, value: Tensor) -> Tensor:
        """`value` as a state tensor of this run (copied into `buffer` when persistent)."""
        return keep(buffer, value, self.persistent)

    def prepare(self, geometry: Geometry, budget: int) -> None:
        """Host-side set-up for a run of this geometry (raise `ValueError` naming the fix if the
        config cannot serve it). Runs outside compiled graphs, before the first step."""
        self.geometry, self.budget = geometry, budget

    def allocate(self, groups: int, geometry: Geometry, budget: int, features: int) -> None:
        """With persistent buffers: allocate every state tensor now, at a static address."""

    def observe_reference(self, output: Tensor) -> None:
        """The driver rows' output at step t0-2 (G, L, F)."""

    def first(self, output: Tensor) -> Tensor:
        """The first pruned step's selection from the output of step t0-1. (G, L, F) -> (G, S)."""
        raise NotImplementedError

    def next(self, output: Tensor, computed: Tensor) -> Tensor:
        """The next pruned step's selection, after a pruned step that computed `computed`
        (G, S) and gave `output` (G, L, F) (the model's estimate for every token)."""
        raise NotImplementedError

    def tensors(self) -> list[Tensor]:
        """The state tensors held now (for the memory figure)."""
        return [t for t in vars(self).values() if isinstance(t, Tensor)]

    def free(self) -> None:
        """Forget the run's tensors."""


class RecencyPolicy(TokenPolicy):
    """A token policy that keeps the recency counter f (G, L): f <- decay·f + 1[computed]."""

    def allocate(self, groups: int, geometry: Geometry, budget: int, features: int) -> None:
        super().allocate(groups, geometry, budget, features)
        self.recency = static_tensor((groups, geometry.tokens), torch.float32, geometry.device)

    def reset_recency(self, output: Tensor) -> None:
        zeros = torch.zeros(output.shape[:2], device=output.device)
        self.recency = self.keep(self.recency, zeros)

    def update_recency(self, computed: Tensor) -> None:
        ranking.update_recency(self.recency, computed, self.config.recency_decay)

    def free(self) -> None:
        super().free()
        self.recency: Tensor | None = None


class DriftPolicy(TokenPolicy):
    """A token policy that reads the drift from the output of step t0-2 (the reference)."""

    def allocate(self, groups: int, geometry: Geometry, budget: int, features: int) -> None:
        super().allocate(groups, geometry, budget, features)
        self.reference = static_tensor(
            (groups, geometry.tokens, features), torch.float32, geometry.device
        )

    def observe_reference(self, output: Tensor) -> None:
        reference = self.reference
        if self.persistent and reference is not None and reference.shape == output.shape:
            reference.copy_(output)  # the float32 buffer of `allocate`: converted in the copy
        else:
            self.reference = self.keep(reference, output)

    def drift(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """(output - reference in float32 (G, L, F), Δ (G, L)); formed once per step, since
        the cluster scores read the difference too. The reference is kept in float32 from
        the first drift on, and a 16-bit output is promoted inside the subtraction: the
        values of output.float() - reference.float(), in one kernel."""
        if self.reference.dtype != torch.float32:
            self.reference = self.reference.float()
        low = output.dtype in (torch.float16, torch.bfloat16, torch.float32)
        diff = (output if low else output.float()) - self.reference
        return diff, ranking.drift(diff)

    def free(self) -> None:
        super().free()
        self.reference: Tensor | None = None


class StepPolicy:
    """Decides which steps after the warm-up run the model; the default runs every step."""

    name: ClassVar[str] = "every"
    skips: ClassVar[bool] = False  # whether `runs_model` can be False (the adapter then
    # installs the forward that gives `output()` without running the model)
    observes_pruned: ClassVar[bool] = True  # whether pruned steps' outputs reach `observe`

    def __init__(self, config: CATConfig):
        self.config = config

    def plan(self, planned_steps: int | None, step_cost_ratio: float, **run) -> None:
        """At a run's first step: fix which steps run the model (`run`: the pipeline's σ
        schedule `sigmas` and guidance scale `guidance`, where known)."""

    def runs_model(self, step: int) -> bool:
        return True

    def observe(self, sample: Tensor, step: int, call: int = 0) -> None:
        """The output of call `call` (0 but for true CFG's second call) of step `step`, which
        ran the model."""

    def output(self, step: int, call: int = 0) -> Tensor:
        """What call `call` of skipped step `step` gives instead of running the model."""
        raise NotImplementedError

    def free(self) -> None:
        """Forget the run's tensors."""
