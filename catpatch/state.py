"""Per-run state of CAT: the step schedule, selection state and caches of one patched model.

Knows nothing about diffusers: the model adapter (`sd3.py`) feeds it the token-level model
output and asks it which tokens to compute. All state hangs off the patched model's
`CATState`; nothing is global.

Tensors are allocated once per run (at the recording step) and then only updated in place, so
within a run every state tensor keeps its address: what CUDA graphs need. With
`persistent_buffers` they also survive the end of a run and are reused by the next run of the
same geometry; otherwise they are freed when the run ends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import clustering, selection
from .config import CATConfig


class Mode(enum.Enum):
    PASS = "pass"  # run the model untouched, state untouched (SLG call, call outside a run)
    FULL = "full"  # warm-up step
    REFERENCE = "reference"  # warm-up step t0-2: keep the output as the drift reference
    RECORD = "record"  # warm-up step t0-1: fill the caches, cluster, first selection
    PRUNED = "pruned"  # compute the selected tokens only
    REUSE = "reuse"  # selection="step": skip the model, give the previous output again


@dataclass(frozen=True)
class Geometry:
    """The shape signature of a run; a call that differs is not part of it."""

    rows: int  # batch rows R of a transformer call (2B under CFG)
    height: int  # token grid H' = latent height / patch
    width: int  # token grid W'
    text_tokens: int
    device: torch.device
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        return self.height * self.width


@dataclass
class BlockCache:
    """What one transformer block keeps between steps (all tokens, per batch row).

    key/value: K/V of the joint attention after qk-norm, image tokens then text tokens
    (R, L+T, D); attn/ff: the block's image attention and FFN outputs before gating (R, L, D);
    *2: the same for the second, image-only attention of SD3.5 dual-attention blocks (no text).
    """

    key: Tensor | None = None
    value: Tensor | None = None
    attn: Tensor | None = None
    ff: Tensor | None = None
    key2: Tensor | None = None
    value2: Tensor | None = None
    attn2: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [t for t in vars(self).values() if t is not None]


def keep(buffer: Tensor | None, value: Tensor, persistent: bool = False) -> Tensor:
    """`value` as a state tensor: copied into `buffer` when that is reusable, else owned."""
    reusable = buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (
        value.shape,
        value.dtype,
        value.device,
    )
    if persistent and reusable:
        return buffer.copy_(value)
    value = value.detach()
    if persistent:
        value = value.clone(memory_format=torch.contiguous_format)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(value)
    return value.contiguous()


@dataclass
class StepRecord:
    mode: Mode
    selected: int  # image tokens computed per row
    tokens: int  # image tokens per row


@dataclass
class RunLog:
    """What the last run did (read by `cat_stats`)."""

    geometry: Geometry | None = None
    budget: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    passthrough_calls: int = 0
    cache_bytes: int = 0  # measured after the first pruned step


class CATState:
    """Schedule, selection state and caches of one patched transformer."""

    def __init__(self, config: CATConfig, num_blocks: int, persistent: bool = False):
        self.config = config
        self.num_blocks = num_blocks
        self.persistent = persistent
        self.cfg_rows = False  # set at each run start from the pipeline's CFG flag
        self.in_run = False
        self.planned_steps: int | None = None
        self.step = 0
        self.mode = Mode.PASS
        self.log = RunLog()
        self.geometry: Geometry | None = None
        self._grids: dict[tuple, clustering.GridGeometry] = {}
        self._free()

    # ---- run boundaries -------------------------------------------------------------------
    def begin_run(self, num_steps: int | None = None, cfg_rows: bool = False) -> None:
        """Start of a generation: forget everything of the previous one."""
        if not self.persistent:
            self._free()
        self.in_run = True
        self.cfg_rows = cfg_rows
        self.planned_steps = num_steps
        self.step = 0
        self.mode = Mode.PASS
        self.log = RunLog()

    def end_run(self) -> None:
        """End of a generation (also after an exception or interrupt): release the caches
        unless they are persistent."""
        self.in_run = False
        self.mode = Mode.PASS
        if not self.persistent:
            self._free()

    def release(self) -> None:
        """Free every tensor, persistent ones included."""
        self.in_run = False
        self.mode = Mode.PASS
        self._free()

    def _free(self) -> None:
        self.caches = [BlockCache() for _ in range(self.num_blocks)]
        self.reference: Tensor | None = None  # (G, L, F) output at step t0-2
        self.previous: Tensor | None = None  # (R, L, F) last output of every token
        self.recency: Tensor | None = None  # (G, L) f
        self.labels: Tensor | None = None  # (G, L) cluster of each token
        self.quotas: Tensor | None = None  # (C,) drift quota by cluster rank
        self.recency_quota = 0
        self.compute_steps: set[int] = set()  # selection="step": full steps after warm-up
        self.last_sample: Tensor | None = None  # selection="step": the output to reuse
        self.chosen: Tensor | None = None  # (G, S) selection of the current / next pruned step
        self.index: Tensor | None = None  # (R, S) the same per batch row, for this step
        self.residual: Tensor | None = None  # (R, L, D) dense residual stream, pruned steps
        self.generator: torch.Generator | None = None

    def keep(self, buffer: Tensor | None, value: Tensor) -> Tensor:
        """`value` as a state tensor of this run (reusing `buffer` when persistent)."""
        return keep(buffer, value, self.persistent)

    def allocate(self, block_shapes: list[dict[str, tuple[int, ...]]], features: int) -> None:
        """Allocate every persistent tensor of a run now, outside any compiled graph, so that
        they have fixed, static addresses (graphs then only update them in place).

        `block_shapes[i]` maps a `BlockCache` field to its shape; `features` is F, the model
        output size per token."""
        geo, budget, groups = self.geometry, self.log.budget, self.groups
        if (
            self.previous is not None
            and self.previous.shape == (geo.rows, geo.tokens, features)
            and self.chosen.shape == (groups, budget)
        ):
            return

        def new(shape, dtype=geo.dtype):
            t = torch.zeros(shape, dtype=dtype, device=geo.device)
            torch._dynamo.mark_static_address(t)
            return t

        for cache, shapes in zip(self.caches, block_shapes, strict=True):
            for name, shape in shapes.items():
                setattr(cache, name, new(shape))
        self.previous = new((geo.rows, geo.tokens, features))
        self.reference = new((groups, geo.tokens, features))
        self.recency = new((groups, geo.tokens), torch.float32)
        self.labels = new((groups, geo.tokens), torch.long)
        self.chosen = new((groups, budget), torch.long)
        self.index = new((geo.rows, budget), torch.long)

    def prunes(self) -> bool:
        """Whether this run reaches pruned steps (as far as known at its start)."""
        return self._prunes()

    def state_tensors(self) -> list[Tensor]:
        tensors = [t for c in self.caches for t in c.tensors()]
        named = (
            self.reference, self.previous, self.recency, self.labels, self.chosen,
            self.index, self.residual,
        )  # fmt: skip
        return tensors + [t for t in named if t is not None]

    def cache_bytes(self) -> int:
        """Bytes held by caches and selection state now."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    # ---- per call ---------------------------------------------------------------------------
    def plan_call(self, geometry: Geometry) -> Mode:
        """Decide what this transformer call does; validates a new run's geometry first."""
        cfg = self.config
        if not self.in_run:
            return Mode.PASS
        if self.step == 0:
            self._start_geometry(geometry)
        elif geometry != self.geometry:
            return Mode.PASS
        t0 = cfg.warmup_steps
        if cfg.selection == "step":
            if not self._prunes() or self.step < t0 or self.step in self.compute_steps:
                return Mode.FULL
            return Mode.REUSE
        if not self._prunes() or self.step < t0 - 2:
            return Mode.FULL
        if self.step == t0 - 2:
            return Mode.REFERENCE
        if self.step == t0 - 1:
            return Mode.RECORD
        return Mode.PRUNED

    def _start_geometry(self, geometry: Geometry) -> None:
        cfg = self.config
        if self.geometry is not None and geometry != self.geometry:
            self._free()  # persistent buffers of another geometry
        budget = cfg.budget(geometry.tokens)
        if self._prunes() and cfg.selection == "cat":
            if cfg.num_clusters > geometry.tokens:
                raise ValueError(
                    f"num_clusters={cfg.num_clusters} exceeds the {geometry.tokens} image tokens "
                    f"of this call ({geometry.height}x{geometry.width} token grid); lower "
                    f"CATConfig.num_clusters or generate at a larger resolution"
                )
            # Built here, outside any compiled region: the grid graph has data-dependent shape,
            # and the quota table would be a host-to-device copy on every step.
            self.grid(geometry)
            quotas, self.recency_quota = selection.cluster_quotas(
                cfg.num_clusters, budget, cfg.cluster_quota
            )
            self.quotas = torch.tensor(quotas, device=geometry.device)
        self.geometry = geometry
        self.log.geometry = geometry
        self.log.budget = budget

    def _prunes(self) -> bool:
        return self.planned_steps is None or self.planned_steps > self.config.warmup_steps

    def plan_reuse(self, step_cost_ratio: float) -> None:
        """selection="step": pick the post-warm-up steps that run the full model, as many as
        the MACs of CAT's pruned steps pay for (`step_cost_ratio` = pruned / full step),
        evenly spaced; the other steps reuse the previous output."""
        if self.planned_steps is None:
            raise ValueError(
                'selection="step" plans whole steps and needs the number of steps: pipelines '
                "give it; in your own loop pass num_inference_steps to cat_generation"
            )
        t0, after = self.config.warmup_steps, max(0, self.planned_steps - self.config.warmup_steps)
        count = min(after, round(after * step_cost_ratio))
        spaced = torch.linspace(0, after - 1, count).round().long().tolist() if count else []
        self.compute_steps = {t0 + i for i in spaced}

    def finish_call(self, mode: Mode) -> None:
        if mode is Mode.PASS:
            self.log.passthrough_calls += self.in_run  # calls outside a run belong to no run
            return
        tokens = self.geometry.tokens
        selected = {Mode.PRUNED: self.log.budget, Mode.REUSE: 0}.get(mode, tokens)
        self.log.steps.append(StepRecord(mode, selected, tokens))
        self.step += 1
        if mode is Mode.PRUNED and not self.log.cache_bytes:
            self.log.cache_bytes = self.cache_bytes()

    # ---- groups: which rows share a selection ---------------------------------------------
    @property
    def groups(self) -> int:
        rows = self.geometry.rows
        return rows // 2 if self._shared_cfg() else rows

    def _shared_cfg(self) -> bool:
        return (
            self.cfg_rows and self.config.cfg_selection == "shared" and self.geometry.rows % 2 == 0
        )

    def driver_rows(self, output: Tensor) -> Tensor:
        """The rows whose output drives the selection: the conditional half under shared CFG."""
        return output[self.groups :] if self._shared_cfg() else output

    def rows_of(self, group_index: Tensor) -> Tensor:
        """Expand a per-group selection (G, S) to the batch rows (R, S)."""
        return group_index.repeat(2, 1) if self._shared_cfg() else group_index

    # ---- the output side of each step ------------------------------------------------------
    def begin_pruned_step(self) -> Tensor:
        """The (R, S) token indices to compute in this pruned step."""
        self.index.copy_(self.rows_of(self.chosen))
        return self.index

    def observe_output(self, mode: Mode, output: Tensor) -> Tensor:
        """Take the model output of a step (R, L, F), update the selection state, return the
        output the model should give (unselected tokens replaced by their previous output)."""
        if mode is Mode.REFERENCE:
            self.reference = keep(self.reference, self.driver_rows(output), self.persistent)
            return output
        if mode is Mode.RECORD:
            self.previous = keep(self.previous, output, self.persistent)
            self._start_pruning(self.driver_rows(output))
            return output
        if mode is not Mode.PRUNED:
            return output
        selection.update_recency(self.recency, self.chosen, self.config.recency_decay)
        computed = torch.zeros(output.shape[:2], dtype=torch.bool, device=output.device)
        computed.scatter_(1, self.index, True)
        result = torch.where(computed[..., None], output, self.previous)
        self.previous.copy_(result)
        self.chosen.copy_(self._select(self.driver_rows(output)))
        return result

    def _start_pruning(self, output: Tensor) -> None:
        cfg, geo, p = self.config, self.geometry, self.persistent
        groups, budget = output.shape[0], self.log.budget
        self.recency = keep(self.recency, torch.zeros(groups, geo.tokens, device=output.device), p)
        if cfg.selection == "random":
            self.generator = torch.Generator(device=output.device).manual_seed(cfg.seed)
        if cfg.selection == "cat":
            grid = self.grid(geo)
            features = clustering.cluster_features(output, grid.position, cfg.cluster_feature_scale)
            labels = clustering.kmeans(features, grid.init, cfg.kmeans_iters)
            self.labels = keep(self.labels, labels, p)
            diff, delta = self._drift(output)
            score = clustering.cluster_scores(diff, self.labels, cfg.num_clusters)
            adjacency = clustering.cluster_adjacency(self.labels, grid.edges, cfg.num_clusters)
            smoothed = clustering.smooth_scores(score, adjacency)
            quota = selection.first_quota_size(budget, cfg.first_quota)
            first = selection.first_selection(delta, smoothed, self.labels, budget, quota)
        else:
            first = self._select(output)
        self.chosen = keep(self.chosen, first, p)
        self.index = keep(self.index, self.rows_of(first), p)

    def _select(self, output: Tensor) -> Tensor:
        cfg, budget = self.config, self.log.budget
        groups, tokens = output.shape[:2]
        if cfg.selection == "random":
            return selection.random_selection(groups, tokens, budget, self.generator, output.device)
        if cfg.selection == "stale":
            return selection.stale_selection(self.recency, budget)
        diff, delta = self._drift(output)
        if cfg.selection == "noise":
            return selection.noise_selection(delta, budget)
        score = clustering.cluster_scores(diff, self.labels, cfg.num_clusters)
        return selection.cat_selection(
            delta,
            score,
            self.labels,
            self.recency,
            budget,
            int(cfg.cluster_fraction * budget),
            self.quotas,
            self.recency_quota,
        )

    def _drift(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """(output - reference in float32 (G, L, F), Δ (G, L))."""
        diff = output.float() - self.reference.float()
        return diff, selection.drift(diff)

    def grid(self, geometry: Geometry) -> clustering.GridGeometry:
        key = (geometry.height, geometry.width, self.config.num_clusters, str(geometry.device))
        if key not in self._grids:
            self._grids[key] = clustering.GridGeometry.build(
                geometry.height, geometry.width, self.config.num_clusters, geometry.device
            )
        return self._grids[key]
