"""`CATConfig`: every knob of CAT pruning, validated on construction."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The budget `CATConfig()` plans when none of the manual knobs (`MANUAL`) nor `macs` is
# given; None: no budget by default (0.3.0's step reuse). Set by the defaults rule
# (`examples/decide_defaults.py --budget`): 0.5 since 0.5.0, the smallest budget ahead of
# 0.3.0's default in every group of the frontier study (README, "Which settings").
DEFAULT_MACS: float | None = 0.5
MANUAL = ("keep_ratio", "warmup_steps", "selection", "reuse_order", "reuse_macs", "token_order")
CFG_SELECTION_MODES = ("shared", "per_row")
ANCHOR_CHOICES = ("score", "random")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")


@dataclass
class CATConfig:
    """Settings of CAT pruning (cluster-aware token pruning with feature caching) and of the
    policies beside it. `CATConfig()` is a MACs budget, `macs=0.5` (the planner chooses which
    steps run the model and how the others are forecast; ahead of every tuned peer in the
    frontier study); naming any manual knob (`keep_ratio`, `warmup_steps`, `selection`, ...)
    gives the manual policies instead, whose default `selection` is step reuse, closer to the
    unpatched images than CAT's token selection at equal MACs; `selection="cat"` (or
    `CATConfig.paper()`) prunes tokens as the paper does.

    Attributes:
        keep_ratio (float, default 0.3): α, the fraction of image tokens recomputed on each pruned
            step; the budget is S = floor(α·L) for L image tokens. Lower is faster (a pruned step
            costs about (S+T)/(L+T) of a full one, T text tokens) and drifts further from the
            unpatched image. 1.0 recomputes every token (the pruned path equals the model).
            "step" spends the MACs of those pruned steps on whole steps instead.
        warmup_steps (int, default 8): t0, full steps before pruning starts (at least 2: step
            t0-2 gives the reference output, step t0-1 the clusters and first selection). More
            warm-up keeps the layout of the image closer to unpatched and saves less. A run with
            no more steps than this is not pruned at all.
        num_clusters (int, default 20): C, spatial k-means clusters of the token grid, made once
            per run. More clusters spread the cluster quota over smaller regions; must not exceed
            the number of image tokens of the call.
        recency_decay (float, default 0.5): each pruned step multiplies every token's recency
            counter by this before adding 1 to the tokens just recomputed. Lower forgets faster.
        cluster_fraction (float, default 0.25): share of S given to the cluster quota (tokens
            that drifted most, walked cluster by cluster); the rest goes to the least recently
            recomputed tokens. 0 gives pure round robin by staleness.
        cluster_quota (float, default 0.05): k as a fraction of S. Walking clusters from the
            best score down, the quotas of top-drift tokens are 3k, 2k, k, k, ...; every cluster
            but the first also gives its k/2 least recently computed tokens.
        first_quota (float, default 0.1): per-cluster quota, as a fraction of S, of the first
            selection (made at step t0-1 from drift alone).
        cluster_feature_scale (float, default 0.05): weight of the model output in the k-means
            features next to the 2-D position code (row/H', col/W'). 0 gives pure spatial tiles;
            larger lets content shape the clusters more.
        kmeans_iters (int, default 10): Lloyd iterations (fixed count: no data-dependent stop).
        selection (str, default "step"): "step" (step-level reuse: after the warm-up, run the
            whole model on evenly spaced steps, as many as CAT's pruned steps would pay for in
            MACs, and give the previous output again on the others; the default since 0.3.0:
            closest to the unpatched images at equal MACs in every group of the quality study
            on both shipped models, see the README), "cat" (cluster-aware token pruning, the
            paper's rules as catpatch implements them), "paper" (cluster-aware with the
            reference code's own selection rules: position added into the k-means features so
            clusters are compact spatial blobs, first-selection scores smoothed per channel
            over the 4-neighbour cluster graph, the reference's quota floors, and each later
            cluster's top-drift quota united with its least recently computed tokens;
            `CATConfig.paper()`), the same-budget token ablations "random" (uniform), "noise"
            (largest drift only, no clusters, no staleness) and "stale" (round robin by recency
            only), or "cat+reuse" (CAT's pruned steps with evenly spaced whole steps skipped in
            between, down to `reuse_macs` of the unpatched MACs).
        cfg_selection (str, default "shared"): under classifier-free guidance, "shared" gives
            the unconditional row the selection of its conditional row (the rows are one image);
            "per_row" selects for every batch row on its own output.
        seed (int, default 0): seeds the "random" selection mode. Clustering is deterministic.
        persistent_buffers (bool, default False): keep the caches allocated between
            generations (reused while the resolution and batch stay the same) instead of
            freeing them when a generation ends. Every state tensor then keeps its address
            across calls, which CUDA graphs need; costs the cache memory between calls.
        compile (str or None, default None): compile the patched transformer in place with
            `torch.compile` in this mode ("default", "reduce-overhead" for CUDA graphs,
            "max-autotune"); implies `persistent_buffers`. Regional: one compiled function
            serves every pruned or recording block, one the full steps' blocks, one the
            selection, each compiled on first use. `remove_cat` undoes it.
        lean (bool, default True): keep no dense residual stream. Unselected tokens' drift
            (what the next selection reads) is then their last computed output instead of a
            fresh estimate from cached block outputs, the attention/FFN output caches go (about
            a third of the cache memory) and the final norm and projection run on the S
            computed tokens only: a cheaper pruned step, as close to the unpatched image as
            `lean=False` on the quality study (+0.03 dB on average, every group within two
            standard errors). False keeps the specification's dense estimate, as the reference
            does (`CATConfig.paper()` sets False).
        reuse_macs (float, default 0.5): selection="cat+reuse": the run's MACs as a fraction of
            the unpatched run's; after the warm-up, as many pruned steps run as fit, evenly
            spaced, and the steps between them are skipped.
        reuse_order (int, default 1): what a skipped step ("step", "cat+reuse") gives: 1 a
            first-order forecast from the last two computed outputs (per token, linear in the
            step index; the default since 0.3.0, ahead of 0 in every group of the study on both
            shipped models), 0 the last computed output again.
        token_order (int, default 0): what a pruned step gives for the tokens it does not
            compute: 0 their last computed output, 1 a first-order forecast from their last two
            computed outputs (per token, linear in the timestep; `catpatch.forecast`).
        macs (float or None, default 0.5 when no manual knob is given, else None): the
            budget knob. B in (0, 1]: the run's
            transformer MACs are at most B of the unpatched run's (rounded down to whole
            steps), and catpatch plans the rest (`catpatch.planner`): which steps run the model
            (warm-up included, not evenly spaced) and how every other step is forecast from
            the computed ones, measured on the model's calibration. The bound speed-up is
            1/B. Replaces `keep_ratio`, `warmup_steps` and `selection` (giving them too is an
            error). At least two steps must fit (B >= 2/N for N steps); the default budget
            computes a shorter run in full, with a warning, instead of failing.
        forecast (str, default "auto"): with `macs`: how a skipped step is forecast from the
            last computed outputs: "auto" (per step, the order 0, 1 or 2 polynomial in σ
            whose error on the calibration is smallest there, a higher order only when 15%
            below the lower: extrapolates over short gaps,
            damps to reuse over long ones, never worse than reuse on the calibration),
            "fit" (weights fitted on the calibration; closer on it, but it generalised
            less well in the frontier study), "reuse" (the last output again), "taylor1" /
            "taylor2" (always order 1 / 2).
        calibration (path, `Calibration` or None, default None): with `macs`: the model's
            calibration (`catpatch.calibrate`). None: the pipeline folder's
            `catpatch_calibration.safetensors` when it has one, else the built-in one of the
            shipped scenes model, with a warning.
        anchors (int, default 0): with `macs`: anchor tokens per CAT cluster (`num_clusters`
            clusters) computed on every forecast step through the pruned-step machinery
            (text K/V read from the last computed step's cache; SD3 family); each cluster's
            tokens move by its anchors' forecast error (`catpatch.correction`). Their MACs
            count in the budget (fewer computed steps). 0: plain forecasts.
        anchor_choice (str, default "score"): which tokens of a cluster are its anchors:
            "score" (how far the forecast moved since the last computed step, discounted by
            how recently the token was an anchor: CAT's drift × staleness) or "random".
        anchor_gain (float, default 1.0): scales each cluster's correction (0 turns it off
            while still computing the anchors).
    """

    keep_ratio: float = 0.3
    warmup_steps: int = 8
    num_clusters: int = 20
    recency_decay: float = 0.5
    cluster_fraction: float = 0.25
    cluster_quota: float = 0.05
    first_quota: float = 0.1
    cluster_feature_scale: float = 0.05
    kmeans_iters: int = 10
    selection: str = "step"
    cfg_selection: str = "shared"
    seed: int = 0
    persistent_buffers: bool = False
    compile: str | None = None
    lean: bool = True
    reuse_macs: float = 0.5
    reuse_order: int = 1
    token_order: int = 0
    macs: float | None = None
    forecast: str = "auto"
    calibration: str | Path | Any | None = None
    anchors: int = 0
    anchor_choice: str = "score"
    anchor_gain: float = 1.0

    def __post_init__(self) -> None:
        given = getattr(self, "_given", None)  # the fields named in the call (see below)
        if DEFAULT_MACS is not None and given is not None and not given & {"macs", *MANUAL}:
            self.macs = DEFAULT_MACS
            self._default_budget = True

        def fail(field: str, why: str) -> None:
            raise ValueError(f"CATConfig.{field}={getattr(self, field)!r}: {why}")

        integers = ("warmup_steps", "num_clusters", "kmeans_iters", "seed", "reuse_order")
        for name in (*integers, "token_order"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "must be an int")
        for name in (
            "keep_ratio",
            "recency_decay",
            "cluster_fraction",
            "cluster_quota",
            "first_quota",
            "cluster_feature_scale",
            "reuse_macs",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(name, "must be a number")
            if not math.isfinite(value):
                fail(name, "must be finite")
        if not 0.0 < self.keep_ratio <= 1.0:
            fail(
                "keep_ratio",
                "must be in (0, 1]; e.g. 0.3: each late step costs about 30% of a full one "
                "(CAT computes 30% of the image tokens; step reuse runs whole steps at that "
                "cost). For a MACs budget use macs= instead",
            )
        if self.warmup_steps < 2:
            fail("warmup_steps", "must be >= 2 (step t0-2 is the reference, t0-1 clusters)")
        if self.num_clusters < 1:
            fail("num_clusters", "must be >= 1")
        if not 0.0 <= self.recency_decay < 1.0:
            fail("recency_decay", "must be in [0, 1)")
        if not 0.0 <= self.cluster_fraction <= 1.0:
            fail("cluster_fraction", "must be in [0, 1]")
        if not 0.0 < self.cluster_quota <= 1.0:
            fail("cluster_quota", "must be in (0, 1]")
        if not 0.0 < self.first_quota <= 1.0:
            fail("first_quota", "must be in (0, 1]")
        if self.cluster_feature_scale < 0:
            fail("cluster_feature_scale", "must be >= 0")
        if not 0.0 < self.reuse_macs <= 1.0:
            fail("reuse_macs", "must be in (0, 1]; e.g. 0.5 halves the MACs of a run")
        if self.reuse_order not in (0, 1):
            fail("reuse_order", "must be 0 (reuse the last output) or 1 (first-order forecast)")
        if self.token_order not in (0, 1):
            fail("token_order", "must be 0 (last computed output) or 1 (first-order forecast)")
        if self.kmeans_iters < 1:
            fail("kmeans_iters", "must be >= 1")
        self._check_budget(fail)
        # Read from the registry now, not copied at import: a policy registered later is
        # accepted. Imported here because the policies' modules refer back to CATConfig.
        from . import policies

        if self.selection not in policies.REGISTRY:
            fail("selection", f"must be one of the registered policies {policies.names()}")
        if self.cfg_selection not in CFG_SELECTION_MODES:
            fail("cfg_selection", f"must be one of {CFG_SELECTION_MODES}")
        for name in ("persistent_buffers", "lean"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be a bool")
        if self.compile not in COMPILE_MODES:
            fail("compile", f"must be one of {COMPILE_MODES}")

    def _check_budget(self, fail) -> None:
        """The budget knob: a number in (0, 1], and not together with the manual knobs."""
        from . import planner
        from .calibration import Calibration

        if self.forecast not in planner.FORECASTS:
            fail("forecast", f"must be one of {planner.FORECASTS}")
        if self.calibration is not None and not isinstance(
            self.calibration, (str, Path, Calibration)
        ):
            fail("calibration", "must be a path, a catpatch.Calibration or None")
        if not isinstance(self.anchors, int) or isinstance(self.anchors, bool) or self.anchors < 0:
            fail("anchors", "must be an int >= 0 (anchor tokens per cluster)")
        if self.anchor_choice not in ANCHOR_CHOICES:
            fail("anchor_choice", f"must be one of {ANCHOR_CHOICES}")
        gain = self.anchor_gain
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0 <= gain <= 2:
            fail("anchor_gain", "must be a number in [0, 2]")
        if self.macs is None:
            if self.anchors:
                fail("anchors", "anchors correct a budgeted run's forecasts: give macs= too")
            return
        if isinstance(self.macs, bool) or not isinstance(self.macs, (int, float)):
            fail("macs", "must be a number in (0, 1], e.g. 0.4 for at most 40% of the MACs")
        if not (math.isfinite(self.macs) and 0.0 < self.macs <= 1.0):
            fail("macs", "must be in (0, 1]: the run's MACs over the unpatched run's, e.g. 0.4")
        manual = [
            name
            for name in ("keep_ratio", "warmup_steps", "selection", "reuse_order")
            if getattr(self, name) != _DEFAULTS[name]
        ]
        if self.anchors and not self.lean:
            fail("lean", "anchors need lean=True (no dense residual stream on anchor steps)")
        if manual:
            fail(
                "macs",
                f"plans {', '.join(manual)} itself: give either macs= (the budget) or the "
                f"manual knobs ({', '.join(f'{m}=' for m in manual)}), not both",
            )

    @property
    def budgeted(self) -> bool:
        """Whether the run is planned from a MACs budget (`macs`)."""
        return self.macs is not None

    @property
    def default_budget(self) -> bool:
        """Whether `macs` is the default budget (no knob named): a run too short for it
        computes every step with a warning instead of failing, as 0.3.0's default did."""
        return getattr(self, "_default_budget", False)

    @property
    def keeps_buffers(self) -> bool:
        """Whether state tensors outlive a generation (persistent_buffers, or compile)."""
        return self.persistent_buffers or self.compile is not None

    @classmethod
    def paper(cls, **overrides) -> CATConfig:
        """The reference setting of the paper: α 0.3, t0 8, 20 clusters, the reference code's
        own selection rules (`selection="paper"`), and its drift input on pruned steps: the
        fresh dense estimate of every token (`lean=False`); `overrides` change any field."""
        settings = {
            "keep_ratio": 0.3,
            "warmup_steps": 8,
            "num_clusters": 20,
            "selection": "paper",
            "lean": False,
        }
        return cls(**{**settings, **overrides})

    def replace(self, **changes) -> CATConfig:
        """A copy with some fields changed (validated again); the default budget stays the
        default unless `macs` or a manual knob is changed."""
        copy = dataclasses.replace(self, **changes)
        if self.default_budget and not set(changes) & {"macs", *MANUAL}:
            copy._default_budget = True
        return copy

    def budget(self, num_tokens: int) -> int:
        """S, the tokens recomputed per pruned step for L = `num_tokens` (at least 1); with
        anchors, `anchors` per cluster."""
        if self.budgeted and self.anchors:
            return max(1, min(num_tokens, self.anchors * self.num_clusters))
        return max(1, min(num_tokens, int(math.floor(self.keep_ratio * num_tokens + 1e-9))))

    def __repr__(self) -> str:
        # Only what differs from the defaults, so a printed config reads as the user wrote it.
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        if self.budgeted:
            changed.sort(key=lambda c: not c.startswith("macs="))  # the budget first
            return f"CATConfig({', '.join(changed)})"
        core = [f"keep_ratio={self.keep_ratio!r}", f"warmup_steps={self.warmup_steps!r}"]
        rest = [c for c in changed if not c.startswith(("keep_ratio=", "warmup_steps="))]
        return f"CATConfig({', '.join(core + rest)})"


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CATConfig)}
_FIELDS = tuple(_DEFAULTS)
_dataclass_init = CATConfig.__init__


def _init_naming_the_given(self, *args, **kwargs) -> None:
    # Which fields the caller named: `CATConfig(keep_ratio=0.3)` sets a manual knob (no
    # default budget) even though 0.3 is its default value; `replace` names every field.
    self._given = frozenset(_FIELDS[: len(args)]) | frozenset(kwargs)
    _dataclass_init(self, *args, **kwargs)


CATConfig.__init__ = functools.wraps(_dataclass_init)(_init_naming_the_given)
