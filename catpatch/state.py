"""Per-run state of CAT: the step schedule, selection state and caches of one patched model.

Knows nothing about diffusers: the model adapter (`sd3.py`) feeds it the token-level model
output and asks it which tokens to compute. All state hangs off the patched model's
`CATState`; nothing is global.
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

    key/value: image K/V of the joint attention (R, L, heads, head_dim); attn/ff: the block's
    image attention and FFN outputs before gating (R, L, D); *2: the same for the second,
    image-only attention of SD3.5 dual-attention blocks.
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

    def __init__(self, config: CATConfig, num_blocks: int):
        self.config = config
        self.num_blocks = num_blocks
        self.cfg_rows = False  # set by the adapter from the pipeline at each run start
        self.in_run = False
        self.planned_steps: int | None = None
        self.step = 0
        self.mode = Mode.PASS
        self.log = RunLog()
        self._grids: dict[tuple, clustering.GridGeometry] = {}
        self._clear()

    # ---- run boundaries -------------------------------------------------------------------
    def begin_run(self, num_steps: int | None = None) -> None:
        """Start of a generation: forget everything of the previous one."""
        self._clear()
        self.in_run = True
        self.planned_steps = num_steps
        self.step = 0
        self.log = RunLog()

    def end_run(self) -> None:
        """End of a generation (also after an exception or interrupt): release the caches."""
        self.in_run = False
        self.mode = Mode.PASS
        self._clear()

    def _clear(self) -> None:
        self.geometry: Geometry | None = None
        self.caches = [BlockCache() for _ in range(self.num_blocks)]
        self.reference: Tensor | None = None
        self.previous: Tensor | None = None
        self.recency: Tensor | None = None
        self.labels: Tensor | None = None
        self.scores: Tensor | None = None
        self.index: Tensor | None = None  # (R, S) tokens computed this step, per row
        self.group_index: Tensor | None = None  # (G, S) the same, per selection group
        self.next_group_index: Tensor | None = None  # (G, S) selection for the next step
        self.residual: Tensor | None = None  # (R, L, D) dense residual stream, pruned steps
        self.generator: torch.Generator | None = None

    def cache_bytes(self) -> int:
        """Bytes held by caches and selection state now."""
        tensors = [t for c in self.caches for t in c.tensors()]
        tensors += [
            t
            for t in (self.reference, self.previous, self.recency, self.labels, self.residual)
            if t is not None
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- per call ---------------------------------------------------------------------------
    def plan_call(self, geometry: Geometry) -> Mode:
        """Decide what this transformer call does; validates a new run's geometry first."""
        cfg = self.config
        if not self.in_run:
            return Mode.PASS
        if self.step == 0:
            if cfg.num_clusters > geometry.tokens and self._prunes():
                raise ValueError(
                    f"num_clusters={cfg.num_clusters} exceeds the {geometry.tokens} image tokens "
                    f"of this call ({geometry.height}x{geometry.width} token grid); lower "
                    f"CATConfig.num_clusters or generate at a larger resolution"
                )
            self.geometry = geometry
            self.log.geometry = geometry
            self.log.budget = cfg.budget(geometry.tokens)
        elif geometry != self.geometry:
            return Mode.PASS
        t0 = cfg.warmup_steps
        if not self._prunes() or self.step < t0 - 2:
            return Mode.FULL
        if self.step == t0 - 2:
            return Mode.REFERENCE
        if self.step == t0 - 1:
            return Mode.RECORD
        return Mode.PRUNED

    def _prunes(self) -> bool:
        return self.planned_steps is None or self.planned_steps > self.config.warmup_steps

    def finish_call(self, mode: Mode) -> None:
        if mode is Mode.PASS:
            self.log.passthrough_calls += 1
            return
        tokens = self.geometry.tokens
        selected = self.log.budget if mode is Mode.PRUNED else tokens
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
        self.group_index = self.next_group_index
        self.index = self.rows_of(self.group_index)
        return self.index

    def observe_output(self, mode: Mode, output: Tensor) -> Tensor:
        """Take the model output of a step (R, L, F), update the selection state, return the
        output the model should give (unselected tokens replaced by their previous output)."""
        if mode is Mode.REFERENCE:
            self.reference = self.driver_rows(output).detach().clone()
            return output
        if mode is Mode.RECORD:
            self.previous = output.detach().clone()
            self._start_pruning(self.driver_rows(output))
            return output
        if mode is not Mode.PRUNED:
            return output
        current = self.driver_rows(output)
        self.recency = selection.update_recency(
            self.recency, self.group_index, self.config.recency_decay
        )
        computed = torch.zeros(output.shape[:2], dtype=torch.bool, device=output.device)
        computed.scatter_(1, self.index, True)
        result = torch.where(computed[..., None], output, self.previous)
        self.previous.copy_(result)
        self.next_group_index = self._select(current)
        return result

    def _start_pruning(self, output: Tensor) -> None:
        cfg, geo = self.config, self.geometry
        groups, budget = output.shape[0], self.log.budget
        self.recency = torch.zeros(groups, geo.tokens, device=output.device)
        if cfg.selection == "random":
            self.generator = torch.Generator(device=output.device).manual_seed(cfg.seed)
        if cfg.selection != "cat":
            self.next_group_index = self._select(output)
            return
        grid = self.grid(output.device)
        features = clustering.cluster_features(output, grid.position, cfg.cluster_feature_scale)
        self.labels = clustering.kmeans(features, grid.init, cfg.kmeans_iters)
        diff = output.float() - self.reference.float()
        score = clustering.cluster_scores(diff, self.labels, cfg.num_clusters)
        adjacency = clustering.cluster_adjacency(self.labels, grid.edges, cfg.num_clusters)
        smoothed = clustering.smooth_scores(score, adjacency)
        quota = selection.first_quota_size(budget, cfg.first_quota)
        self.next_group_index = selection.first_selection(
            selection.drift(output, self.reference), smoothed, self.labels, budget, quota
        )

    def _select(self, output: Tensor) -> Tensor:
        cfg, budget = self.config, self.log.budget
        groups, tokens = output.shape[:2]
        if cfg.selection == "random":
            return selection.random_selection(
                groups, tokens, budget, self.generator, output.device
            )
        if cfg.selection == "stale":
            return selection.stale_selection(self.recency, budget)
        delta = selection.drift(output, self.reference)
        if cfg.selection == "noise":
            return selection.noise_selection(delta, budget)
        diff = output.float() - self.reference.float()
        score = clustering.cluster_scores(diff, self.labels, cfg.num_clusters)
        return selection.cat_selection(
            delta,
            score,
            self.labels,
            self.recency,
            budget,
            int(cfg.cluster_fraction * budget),
            cfg.cluster_quota,
        )

    def grid(self, device) -> clustering.GridGeometry:
        geo = self.geometry
        key = (geo.height, geo.width, self.config.num_clusters, str(device))
        if key not in self._grids:
            self._grids[key] = clustering.GridGeometry.build(
                geo.height, geo.width, self.config.num_clusters, device
            )
        return self._grids[key]
