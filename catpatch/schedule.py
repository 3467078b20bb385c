"""The run schedule: which step of a generation a transformer call is, and what it does.

`Schedule` counts the steps of one generation, checks that each call belongs to the run's
geometry, and gives each call a `Mode` from the warm-up length and the step policy. It also
knows which batch rows share a selection (a CFG pair), and which calls share a step: a
pipeline may call the transformer more than once per step (true CFG as two calls, conditional
then unconditional); the later calls of a step "follow" its first one (same mode, same
selection, caches of their own). It holds no tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import CATConfig


class Mode(enum.Enum):
    PASS = "pass"  # run the model untouched, state untouched (SLG call, call outside a run)
    FULL = "full"  # warm-up step
    REFERENCE = "reference"  # warm-up step t0-2: keep the output as the drift reference
    RECORD = "record"  # warm-up step t0-1: fill the caches, cluster, first selection
    PRUNED = "pruned"  # compute the selected tokens only
    REUSE = "reuse"  # the step policy skips this step: give its output without the model


@dataclass(frozen=True)
class Geometry:
    """The shape signature of a run; a call that differs is not part of it."""

    rows: int  # batch rows R of a transformer call (2B under CFG)
    height: int  # token grid H' = latent height / patch
    width: int  # token grid W'
    text_tokens: int
    device: torch.device
    dtype: torch.dtype
    # Whether the text tokens join the image tokens' attention (SD3's joint attention) and so
    # sit in each block's K/V cache; False where image tokens attend to the text in a separate
    # cross-attention (PixArt), whose K/V cache holds image tokens only.
    joint_text: bool = True

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def kv_text_tokens(self) -> int:
        """Text tokens in each block's K/V cache after the L image tokens."""
        return self.text_tokens if self.joint_text else 0


@dataclass
class StepRecord:
    mode: Mode
    selected: int  # image tokens computed per row
    tokens: int  # image tokens per row
    calls: int = 1  # transformer calls of the step (2 for true CFG as separate calls)


@dataclass
class RunLog:
    """What the last run did (read by `cat_stats`)."""

    geometry: Geometry | None = None
    budget: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    passthrough_calls: int = 0
    cache_bytes: int = 0  # measured after the first pruned step


class Schedule:
    """Step counter, mode and geometry of the current generation of one patched model."""

    def __init__(self, config: CATConfig):
        self.config = config
        # set at each run start from the pipeline's CFG flag; None: not known yet (the model
        # adapter decides from the run's first call)
        self.cfg_rows: bool | None = False
        self.in_run = False
        self.planned_steps: int | None = None
        self.step = 0
        self.mode = Mode.PASS
        self.log = RunLog()
        self.geometry: Geometry | None = None
        # Transformer calls per step; None: as many as come before the loop calls `end_step`.
        self.calls_per_step: int | None = 1
        self.call = 0  # calls of the current step so far
        self.step_mode = Mode.PASS  # the mode the current step's first call got
        # What a planned run needs of the pipeline: its σ schedule and guidance scale.
        self.run_info: dict = {}

    @property
    def warmup(self) -> int:
        """Full steps before the policy decides (a budgeted run plans its warm-up itself)."""
        return 0 if self.config.budgeted else self.config.warmup_steps

    def begin(
        self,
        num_steps: int | None,
        cfg_rows: bool | None,
        calls_per_step: int | None = 1,
        run_info: dict | None = None,
    ) -> None:
        self.in_run = True
        self.run_info = dict(run_info or {})
        self.cfg_rows = cfg_rows
        self.planned_steps = num_steps
        self.calls_per_step = calls_per_step
        self.step = self.call = 0
        self.mode = Mode.PASS
        self.log = RunLog()

    def end(self) -> None:
        self.in_run = False
        self.mode = Mode.PASS

    def prunes(self) -> bool:
        """Whether this run reaches pruned steps (as far as known at its start)."""
        return self.planned_steps is None or self.planned_steps > self.warmup

    def start(self, geometry: Geometry) -> None:
        """The first call of a run fixes its geometry and token budget S."""
        self.geometry = geometry
        self.log.geometry = geometry
        self.log.budget = self.config.budget(geometry.tokens)

    def mode_of_step(self, prunes_tokens: bool, runs_model: bool) -> Mode:
        """The mode of this step, given whether a token policy prunes and whether the step
        policy runs the model on it."""
        t0, step = self.warmup, self.step
        if not self.prunes() or step < t0 - (2 if prunes_tokens else 0):
            return Mode.FULL
        if self.config.budgeted and prunes_tokens:  # anchors: record, or anchor the forecast
            return Mode.RECORD if runs_model else Mode.PRUNED
        if not runs_model:
            return Mode.REUSE
        if not prunes_tokens:
            return Mode.FULL
        if step == t0 - 2:
            return Mode.REFERENCE
        if step == t0 - 1:
            return Mode.RECORD
        return Mode.PRUNED

    @property
    def follower(self) -> bool:
        """Whether this call is a later call of a step whose first call already ran (e.g. the
        unconditional call of true CFG): it takes that call's mode and selection."""
        return self.call > 0

    def finish(self, mode: Mode) -> None:
        """Log a call of this run; the step ends after `calls_per_step` calls, or when the
        loop says so (`end_step`)."""
        if mode is Mode.PASS:
            self.log.passthrough_calls += self.in_run  # calls outside a run belong to no run
            return
        if self.follower:
            self.log.steps[-1].calls += 1
        else:
            tokens = self.geometry.tokens
            selected = {Mode.PRUNED: self.log.budget, Mode.REUSE: 0}.get(mode, tokens)
            self.log.steps.append(StepRecord(mode, selected, tokens))
            self.step_mode = mode
        self.call += 1
        if self.calls_per_step is not None and self.call >= self.calls_per_step:
            self.end_step()

    def end_step(self) -> None:
        """The denoising loop finished a step (a no-op when no call of it ran)."""
        if self.call:
            self.step += 1
            self.call = 0

    # ---- groups: which rows share a selection ---------------------------------------------
    @property
    def groups(self) -> int:
        rows = self.geometry.rows
        return rows // 2 if self.shared_cfg() else rows

    def shared_cfg(self) -> bool:
        return (
            self.cfg_rows and self.config.cfg_selection == "shared" and self.geometry.rows % 2 == 0
        )

    @property
    def driver_slice(self) -> slice:
        """The batch rows that drive the selection (and keep output caches)."""
        return slice(self.groups, None) if self.shared_cfg() else slice(None)

    def driver_rows(self, output: Tensor) -> Tensor:
        """The rows whose output drives the selection: the conditional half under shared CFG."""
        return output[self.groups :] if self.shared_cfg() else output

    def rows_of(self, group_index: Tensor) -> Tensor:
        """Expand a per-group selection (G, S) to the batch rows (R, S)."""
        return group_index.repeat(2, 1) if self.shared_cfg() else group_index
