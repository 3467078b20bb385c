"""`CATState`: one patched model's run, put together from its parts.

The schedule (`schedule.py`) says what each call does, the caches (`caches.py`) hold what pruned
steps read, the policies (`policies/`) choose the tokens and steps; this class calls each at its
point of the step and owns the selection that passes between them: `chosen` (G, S), one
selection per group of rows, and `index` (R, S), the same per batch row for the current step.
Knows nothing about diffusers: the model adapter (`sd3/`, `flux/`, `pixart/`) feeds it the
token-level model output.
All state hangs off the patched model; nothing is global.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import policies
from .caches import Caches, StepIndex, gather_tokens, keep, static_tensor, write_rows
from .config import CATConfig
from .correction import cluster_correction
from .forecast import TokenForecast
from .schedule import Geometry, Mode, Schedule


class CATState:
    """Schedule, caches, policies and current selection of one patched transformer."""

    def __init__(self, config: CATConfig, num_blocks: int, persistent: bool = False):
        self.config = config
        self.persistent = persistent
        self.schedule = Schedule(config)
        # One set of caches per call of a step: a follower call (the unconditional call of true
        # CFG) has K/V and outputs of its own, and the selection of the step's first call.
        self.lanes = [Caches(num_blocks, persistent)]
        self.caches = self.lanes[0]
        self.tokens, self.steps = policies.build(config, persistent)
        self.forecast = TokenForecast(persistent) if config.token_order else None
        # The part of the model output (R, L, F) the token policy reads (drift and clustering),
        # set by a model adapter whose output holds more than the prediction (PixArt's learned
        # variance channels); None: all of it.
        self.drift_view: Callable[[Tensor], Tensor] | None = None
        # The model output of a whole call (what a step policy forecasts) as tokens (R, L, F),
        # set by a model adapter whose blocks serve anchor steps.
        self.sample_tokens: Callable[[Tensor], Tensor] | None = None
        self._free()

    # ---- run boundaries -------------------------------------------------------------------
    def begin_run(
        self,
        num_steps: int | None = None,
        cfg_rows: bool | None = False,
        calls_per_step: int | None = 1,
        run_info: dict | None = None,
    ) -> None:
        """Start of a generation: forget everything of the previous one. `cfg_rows` None: not
        known from the pipeline; the model adapter sets `schedule.cfg_rows` at the first call.
        `calls_per_step`: transformer calls per denoising step (None: until the loop calls
        `end_step`). `run_info`: what a planned run reads of the pipeline (`sigmas`, the
        run's σ schedule; `guidance`, its CFG scale)."""
        if not self.persistent:
            self._free()
        self.schedule.begin(num_steps, cfg_rows, calls_per_step, run_info)

    def end_step(self) -> None:
        """The denoising loop finished a step (see `Schedule.end_step`)."""
        self.schedule.end_step()

    def end_run(self) -> None:
        """End of a generation (also after an exception or interrupt): release the caches
        unless they are persistent."""
        self.schedule.end()
        if not self.persistent:
            self._free()

    def release(self) -> None:
        """Free every tensor, persistent ones included."""
        self.schedule.end()
        self._free()

    def _free(self) -> None:
        for lane in self.lanes:
            lane.free()
        self.caches = self.lanes[0]
        if self.tokens is not None:
            self.tokens.free()
        self.steps.free()
        if self.forecast is not None:
            self.forecast.free()
        self.chosen: Tensor | None = None  # (G, S) selection of the current / next pruned step
        self.step_index: StepIndex | None = None  # where this pruned step's tokens go

    @property
    def index(self) -> Tensor | None:
        """(R, S): the tokens each batch row computes in this pruned step."""
        return None if self.step_index is None else self.step_index.index

    @property
    def log(self):
        return self.schedule.log

    @property
    def dense(self) -> bool:
        """Whether this call keeps the dense residual stream (not lean, and the call drives the
        selection: a follower call's fresh estimates would reach nothing)."""
        return not self.config.lean and not self.schedule.follower

    def state_tensors(self) -> list[Tensor]:
        tensors = [t for lane in self.lanes for t in lane.tensors()]
        if self.tokens is not None:
            tensors += self.tokens.tensors()
        if self.step_index is not None:
            tensors += self.step_index.tensors()
        if self.forecast is not None:
            tensors += self.forecast.tensors()
        return tensors + [t for t in (self.chosen,) if t is not None]

    def cache_bytes(self) -> int:
        """Bytes held by caches and selection state now."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    # ---- per call ---------------------------------------------------------------------------
    def plan_call(self, geometry: Geometry, step_cost_ratio: Callable[[], float]) -> Mode:
        """Decide what this transformer call does; a run's first call fixes its geometry and
        plans it (`step_cost_ratio()`: MACs of a pruned step over a full one, for step
        policies that trade whole steps against pruned ones)."""
        schedule = self.schedule
        if not schedule.in_run:
            return Mode.PASS
        if schedule.follower:
            return self._plan_follower(geometry)
        self.caches = self.lanes[0]
        if schedule.step == 0:
            if schedule.geometry is not None and geometry != schedule.geometry:
                self._free()  # persistent buffers of another geometry
            if schedule.prunes() and self.tokens is not None:
                self.tokens.prepare(geometry, self.config.budget(geometry.tokens))
            schedule.start(geometry)
            if self.steps.skips:
                self.steps.plan(schedule.planned_steps, step_cost_ratio(), **schedule.run_info)
            self._warn_if_nothing_saved()
        elif geometry != schedule.geometry:
            return Mode.PASS
        return schedule.mode_of_step(self.tokens is not None, self.steps.runs_model(schedule.step))

    def _warn_if_nothing_saved(self) -> None:
        """One warning per patch when a run's settings compute every step in full (a short
        schedule within the warm-up): the user would otherwise see MACs 1.000 and no word."""
        steps, schedule = self.schedule.planned_steps, self.schedule
        if steps is None or getattr(self, "_warned_nothing_saved", False):
            return
        if self.steps.skips:
            saves = any(not self.steps.runs_model(i) for i in range(steps))
        else:
            saves = self.tokens is not None and schedule.prunes()
        if saves:
            return
        self._warned_nothing_saved = True
        fix = (
            f"the default budget (macs={self.config.macs:g}) needs more steps to skip any: "
            "use more steps or name a larger macs="
            if self.config.default_budget
            else f"macs={self.config.macs:g} pays for every step: lower it"
            if self.config.budgeted
            else f"use fewer warm-up steps (warmup_steps={self.config.warmup_steps}) or a "
            "budget: CATConfig(macs=0.5) plans short schedules too"
        )
        warnings.warn(
            f"catpatch: this {steps}-step run computes every step in full, so it saves "
            f"nothing; {fix}",
            stacklevel=2,
        )

    def _plan_follower(self, geometry: Geometry) -> Mode:
        """A later call of the step: the first call's mode, on caches of its own."""
        schedule, mode = self.schedule, self.schedule.step_mode
        if geometry != schedule.geometry:
            return Mode.PASS
        if mode is Mode.REUSE:  # the step policy keeps each call's outputs apart
            return mode
        if self.forecast is not None and mode is not Mode.FULL:
            raise NotImplementedError(
                "catpatch: a denoising step with several transformer calls (true CFG as "
                "separate calls) cannot forecast tokens: token_order=1 keeps one output per "
                "step. Use token_order=0, or no true CFG"
            )
        while len(self.lanes) <= schedule.call:
            self.lanes.append(Caches(self.caches.num_blocks, self.persistent))
        self.caches = self.lanes[schedule.call]
        return mode

    def allocate(self, block_shapes: list[dict[str, tuple[int, ...]]], features: int) -> None:
        """Allocate every persistent tensor of a run now, outside any compiled graph, so that
        they have fixed, static addresses (graphs then only update them in place).

        `block_shapes[i]` maps a `BlockCache` field to its shape; `features` is F, the model
        output size per token."""
        # F' of what the token policy reads, from an empty stand-in output (no data)
        drift_features = self.drift(torch.empty(0, 0, features, device="meta")).shape[-1]
        geo, budget, groups = self.schedule.geometry, self.log.budget, self.schedule.groups
        previous = self.caches.previous
        ready = previous is not None and previous.shape == (geo.rows, geo.tokens, features)
        if self.schedule.follower:  # its own caches; the selection is the first call's
            if not ready:
                shape = (geo.rows, geo.tokens, features)
                self.caches.allocate(block_shapes, shape, geo.dtype, geo.device)
            return
        if ready and self.chosen.shape == (groups, budget):
            return
        self.caches.allocate(block_shapes, (geo.rows, geo.tokens, features), geo.dtype, geo.device)
        self.tokens.allocate(groups, geo, budget, drift_features)
        if self.forecast is not None:
            self.forecast.allocate((geo.rows, geo.tokens, features), geo.device)
        self.chosen = static_tensor((groups, budget), torch.long, geo.device)
        self._start_step_index(self.chosen)
        for tensor in self.step_index.tensors():
            torch._dynamo.mark_static_address(tensor)

    def finish_call(self, mode: Mode) -> None:
        self.schedule.finish(mode)
        if mode is Mode.PRUNED and not self.log.cache_bytes:
            self.log.cache_bytes = self.cache_bytes()

    # ---- the output side of each step ------------------------------------------------------
    def begin_pruned_step(self) -> StepIndex:
        """Where this pruned step's tokens go: the selection made after the last step, per
        batch row and as rows of the flattened caches (a few small kernels, once per step)."""
        self.step_index.update(self.chosen)
        return self.step_index

    def _start_step_index(self, first: Tensor) -> None:
        """The step index of this run, from the first selection (at the recording step);
        updated in place when persistent buffers already hold one of this geometry."""
        schedule, step = self.schedule, self.step_index
        if step is not None and step.index.shape == (schedule.geometry.rows, first.shape[1]):
            step.update(first)
            return
        geo, shared = schedule.geometry, schedule.shared_cfg()
        self.step_index = StepIndex.of(
            schedule.rows_of(first),
            geo.tokens,
            geo.kv_text_tokens,
            chosen=first if shared else None,
            rows=schedule.driver_slice,
        )

    def drift(self, output: Tensor) -> Tensor:
        """What the token policy reads of a model output (see `drift_view`)."""
        return output if self.drift_view is None else self.drift_view(output)

    def observe_output(self, mode: Mode, output: Tensor, time: Tensor | None = None) -> Tensor:
        """Take the model output of a step (R, L, F) at timestep `time` (R,), update the
        selection state, return the output the model should give (unselected tokens replaced by
        their previous output, or its forecast with `token_order=1`, which needs `time`)."""
        schedule, caches, p, forecast = self.schedule, self.caches, self.persistent, self.forecast
        if schedule.follower:
            return self._observe_follower(mode, output)
        if mode is Mode.REFERENCE:
            self.tokens.observe_reference(self.drift(schedule.driver_rows(output)))
            if forecast is not None:
                forecast.observe_reference(output, time)
            return output
        if mode is Mode.RECORD:
            caches.previous = keep(caches.previous, output, p)
            first = self.tokens.first(self.drift(schedule.driver_rows(output)))
            self.chosen = keep(self.chosen, first, p)
            self._start_step_index(first)
            if forecast is not None:
                forecast.start(output, time)
            return output
        if mode is not Mode.PRUNED:
            return output
        step = self.step_index
        if self.config.budgeted:  # an anchor step: correct the step policy's forecast
            result = self._anchored(output, step)
            self.chosen.copy_(
                self.tokens.next(self.drift(schedule.driver_rows(result)), self.chosen)
            )
            return result
        # lean: `output` holds the computed tokens only; the others' drift is their last output
        # (or its forecast)
        computed = output if self.config.lean else gather_tokens(output, step.index)
        if forecast is not None:
            forecast.update(caches.previous, step.index, step.image, computed, time)
        write_rows(caches.previous, step.image, computed)
        if forecast is not None:
            result = forecast.apply(caches.previous, time)
        else:
            result = caches.previous.clone()
        estimate = result if self.config.lean else output
        drift = self.drift(schedule.driver_rows(estimate))
        self.chosen.copy_(self.tokens.next(drift, self.chosen))
        return result

    def _anchored(self, computed: Tensor, step: StepIndex) -> Tensor:
        """The forecast of this step (the step policy's), moved cluster by cluster by its
        anchors' errors; `computed` (R, S, F) are the anchors' outputs."""
        schedule = self.schedule
        forecast = self.sample_tokens(self.steps.output(schedule.step, schedule.call))
        labels = schedule.rows_of(self.tokens.labels)
        return cluster_correction(
            forecast, computed, step.index, step.image, labels, self.config.num_clusters,
            self.config.anchor_gain,
        )  # fmt: skip

    def _observe_follower(self, mode: Mode, output: Tensor) -> Tensor:
        """A follower call's output: its own previous outputs stand in for the tokens it did
        not compute; the selection stays the step's first call's (computed-only output: a
        follower keeps no dense stream)."""
        caches = self.caches
        if mode is Mode.RECORD:
            caches.previous = keep(caches.previous, output, self.persistent)
        elif mode is Mode.PRUNED:
            write_rows(caches.previous, self.step_index.image, output)
            return caches.previous.clone()
        return output
