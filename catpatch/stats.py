"""Cost accounting: the MAC model of an SD3-family step, and `cat_stats` of the last run.

`cat_stats` reads each family's cost model through its adapter's `step_macs` (one call, one
batch row; every call of every step counts); the SD3 one is here:

The model is the specification's (per block and sample, D hidden, L image, T text, S computed
tokens): 12·D²·(S+T) for projections and FFNs plus 2·D·(S+T)·(L+T) for joint attention, made
exact for what the spec leaves out: the last block has no text output projection or text FFN,
SD3.5 dual-attention blocks add an image-only attention (4·D²·S + 2·D·S·L), and every step pays
the embedders, the AdaLN modulation and the output projection of all L tokens. That is SD3's
`ModelDims`; other families give their own `CostModel` (FLUX.1: `flux/cost.py`, PixArt-Σ:
`pixart/cost.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import CATConfig
from .schedule import Mode


class CostModel(Protocol):
    """The MAC model of one model family (each adapter gives one: `adapter.cost_model()`)."""

    def step_macs(
        self, tokens: int, text: int, computed: int | None = None, lean: bool = False
    ) -> int:
        """MACs of one transformer call for one sample, `computed` of `tokens` image tokens
        computed (all when None); `lean`: the output projection runs on those only."""
        ...

    def run_bound(self, steps: int, warmup: int, tokens: int, text: int, budget: int) -> float:
        """The arithmetic speed-up bound of a run with `warmup` full steps."""
        ...


@dataclass(frozen=True)
class ModelDims:
    """The sizes of an SD3-family transformer that its cost depends on (a `CostModel`)."""

    hidden: int
    layers: int
    dual_layers: int
    patch: int
    in_channels: int
    out_channels: int
    joint_dim: int
    pooled_dim: int
    ff_mult: int = 4
    time_proj_dim: int = 256

    @classmethod
    def from_config(cls, config) -> ModelDims:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        layers = get("num_layers")
        return cls(
            hidden=get("num_attention_heads") * get("attention_head_dim"),
            layers=layers,
            dual_layers=len([i for i in (get("dual_attention_layers") or ()) if i < layers]),
            patch=get("patch_size"),
            in_channels=get("in_channels"),
            out_channels=get("out_channels") or get("in_channels"),
            joint_dim=get("joint_attention_dim"),
            pooled_dim=get("pooled_projection_dim"),
        )

    def step_macs(
        self, tokens: int, text: int, computed: int | None = None, lean: bool = False,
        text_cached: bool = False,
    ) -> int:  # fmt: skip
        return step_macs(self, tokens, text, computed, lean, text_cached)

    def run_bound(self, steps: int, warmup: int, tokens: int, text: int, budget: int) -> float:
        return run_bound(steps, warmup, tokens, text, budget)


def block_macs(
    d: int, tokens: int, text: int, computed: int, last: bool, dual: bool,
    text_cached: bool = False,
) -> int:  # fmt: skip
    """MACs of one block for one sample, `computed` of the `tokens` image tokens computed;
    `text_cached`: the text stream is not computed (an anchor step reads its cached K/V)."""
    ff = 2 * 4 * d * d  # two linears, hidden 4·D
    image = (4 * d * d + ff) * computed  # Q, K, V, out + FFN
    context = 3 * d * d * text + (0 if last else (d * d + ff) * text)
    attention = 2 * d * (computed + text) * (tokens + text)
    modulation = d * (9 if dual else 6) * d + d * (2 if last else 6) * d
    if text_cached:
        context, modulation = 0, d * (9 if dual else 6) * d
        attention = 2 * d * computed * (tokens + text)
    if dual:
        image += 4 * d * d * computed
        attention += 2 * d * computed * tokens
    return image + context + attention + modulation


def step_macs(
    dims: ModelDims, tokens: int, text: int, computed: int | None = None, lean: bool = False,
    text_cached: bool = False,
) -> int:  # fmt: skip
    """MACs of one transformer call for one sample (batch rows multiply it); `lean`: the
    output projection runs on the computed tokens only; `text_cached`: an anchor step (no
    text stream in the blocks)."""
    d = dims.hidden
    computed = tokens if computed is None else computed
    projected = computed if lean else tokens
    outer = (
        tokens * dims.patch**2 * dims.in_channels * d  # patch embedding
        + text * dims.joint_dim * d  # context embedder
        + dims.time_proj_dim * d
        + d * d
        + dims.pooled_dim * d
        + d * d  # time/text embedding
        + d * 2 * d  # final AdaLN
        + projected * d * dims.patch**2 * dims.out_channels  # proj_out
    )
    blocks = sum(
        block_macs(
            d, tokens, text, computed, last=i == dims.layers - 1, dual=i < dims.dual_layers,
            text_cached=text_cached,
        )
        for i in range(dims.layers)
    )
    return outer + blocks


def run_macs(
    dims: CostModel,
    rows: int,
    tokens: int,
    text: int,
    budget: int,
    steps: int,
    pruned: int,
    reused: int = 0,
    lean: bool = False,
) -> tuple[int, int]:
    """(MACs of a run with `pruned` of `steps` steps pruned and `reused` not computed at all,
    MACs of the same run unpatched)."""
    full = dims.step_macs(tokens, text)
    cut = dims.step_macs(tokens, text, budget, lean)
    return rows * ((steps - pruned - reused) * full + pruned * cut), rows * steps * full


def spec_step_ratio(tokens: int, text: int, budget: int) -> float:
    """The specification's cost of a pruned step relative to a full one: (S+T)/(L+T)."""
    return (budget + text) / (tokens + text)


def run_bound(steps: int, warmup: int, tokens: int, text: int, budget: int) -> float:
    """Arithmetic speed-up bound of a run: N / (t0 + (N - t0)·(S+T)/(L+T))."""
    if steps <= warmup:
        return 1.0
    return steps / (warmup + (steps - warmup) * spec_step_ratio(tokens, text, budget))


def measured_macs(run: Callable[[], object], module: str | None = None) -> int:
    """MACs (half the FLOPs) that torch's FLOP counter sees while `run()` runs: all of them, or
    those inside modules of class name `module` (e.g. "SD3Transformer2DModel", to leave out the
    text encoders and VAE of a pipeline). Attention on the CPU is counted as on a GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    if module is None:
        return counter.get_total_flops() // 2
    return sum(counter.get_flop_counts().get(module, {}).values()) // 2


def count_cpu_attention() -> None:
    """Teach torch's FLOP counter the CPU attention kernel (it knows the CUDA ones only; the
    arithmetic is the same)."""
    import torch
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(op)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@dataclass
class CATStats:
    """What the last generation of a patched model did."""

    config: CATConfig
    steps: int = 0
    pruned_steps: int = 0
    reused_steps: int = 0  # selection="step": steps that gave the previous output again
    tokens: int = 0  # L, image tokens per sample
    budget: int = 0  # S, tokens computed per pruned step
    text_tokens: int = 0
    rows: int = 0  # batch rows per transformer call (2B under CFG)
    calls_per_step: int = 1  # transformer calls per step (2 under true CFG as two calls)
    computed_fraction: float = 1.0  # image tokens computed over the run / all
    macs: int = 0  # the run, all rows
    macs_unpatched: int = 0  # the same run unpatched
    cache_bytes: int = 0  # held by the caches during pruned steps
    passthrough_calls: int = 0  # skip-layer-guidance / out-of-run calls run unpruned
    per_step: list[tuple[str, int, int]] = field(default_factory=list)  # (mode, S, L)
    plan: Any = None  # `planner.Plan` of a budgeted run (`CATConfig(macs=...)`)

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.macs_unpatched if self.macs_unpatched else 1.0

    @property
    def bound(self) -> float:
        """The arithmetic speed-up bound of the run: 1 / MACs ratio."""
        return 1 / self.macs_ratio if self.macs_ratio else float("inf")

    def summary(self) -> str:
        """One line: which policy ran, what it computed and skipped, the MACs and bound."""
        from .policies import policy_label

        if not self.steps:
            return "catpatch: no generation has run since apply_cat"
        # The selection always shows: the default is not the paper's token selection.
        config = repr(self.config)
        if not self.config.budgeted and "selection=" not in config:
            config = config[:-1] + f", selection={self.config.selection!r})"
        calls = f" x {self.calls_per_step} calls" if self.calls_per_step > 1 else ""
        computed = self.steps - self.pruned_steps - self.reused_steps
        if self.plan is not None:
            forecast = FORECAST_WORDS[self.plan.forecast]
            what = (
                f"{computed} computed (steps {self.plan.describe()}), {self.reused_steps} "
                f"forecast ({forecast})"
            )
        elif self.reused_steps:
            order = "forecast from the last two" if self.config.reuse_order else "reused"
            pruned = f", {self.pruned_steps} pruned" if self.pruned_steps else ""
            what = f"{computed} computed{pruned}, {self.reused_steps} skipped ({order})"
        else:
            what = f"{computed} full, {self.pruned_steps} pruned"
        tokens = ""
        if self.pruned_steps:
            tokens = (
                f" (S={self.budget} of L={self.tokens} image tokens, T={self.text_tokens} text, "
                f"{self.rows} rows{calls}); image tokens computed {self.computed_fraction:.1%}"
            )
        budget = f", budget {self.config.macs:g}" if self.config.budgeted else ""
        caches = f"; caches {self.cache_bytes / 2**20:.1f} MiB" if self.pruned_steps else ""
        return (
            f"catpatch {policy_label(self.config)} {config}: {self.steps} steps{calls}, "
            f"{what}{tokens}; MACs {self.macs / 1e9:.3g} G vs {self.macs_unpatched / 1e9:.3g} G "
            f"unpatched ({self.macs_ratio:.3f}{budget}; at most {self.bound:.2f}x){caches}"
        )


FORECAST_WORDS = {
    "auto": "order 0, 1 or 2 in sigma per step, as measured on the calibration",
    "fit": "weights fitted on the calibration, from the last 3 computed",
    "reuse": "the last computed output",
    "taylor1": "first-order extrapolation in sigma",
    "taylor2": "second-order extrapolation in sigma",
}


def anchored(config: CATConfig) -> dict:
    """The cost-model keyword of a budgeted run with anchors (their steps skip the text)."""
    return {"text_cached": True} if config.budgeted and config.anchors else {}


def collect(patch, transformer) -> CATStats:
    """Build `CATStats` from a patch's run log; the MACs from the cost model of the patch's
    adapter (`step_macs`: one call, one batch row), for every call of every step."""
    log = patch.state.log
    stats = CATStats(config=patch.config, passthrough_calls=log.passthrough_calls)
    if log.geometry is None or not log.steps:
        return stats
    geo = log.geometry
    stats.steps = len(log.steps)
    stats.pruned_steps = sum(s.mode is Mode.PRUNED for s in log.steps)
    stats.reused_steps = sum(s.mode is Mode.REUSE for s in log.steps)
    stats.tokens, stats.budget = geo.tokens, log.budget
    stats.text_tokens, stats.rows = geo.text_tokens, geo.rows
    stats.per_step = [(s.mode.value, s.selected, s.tokens) for s in log.steps]
    computed = sum(s.selected for s in log.steps)
    stats.computed_fraction = computed / (geo.tokens * stats.steps)
    cost = patch.adapter.step_macs
    full = cost(geo.tokens, geo.text_tokens)
    cut = cost(geo.tokens, geo.text_tokens, log.budget, patch.config.lean, **anchored(patch.config))
    per_mode = {Mode.PRUNED: cut, Mode.REUSE: 0}
    stats.calls_per_step = max(s.calls for s in log.steps)
    stats.macs = geo.rows * sum(s.calls * per_mode.get(s.mode, full) for s in log.steps)
    stats.macs_unpatched = geo.rows * sum(s.calls * full for s in log.steps)
    stats.cache_bytes = log.cache_bytes
    stats.plan = getattr(patch.state.steps, "plan_of_run", None)
    return stats
