"""Census of one step: kernels, bytes moved and FLOPs of a full and a pruned step, no GPU needed.

The transformer is built on the `meta` device at its real size (e.g. SD3-medium at 1024²), so
every op runs shape-only in milliseconds; a `TorchDispatchMode` records each aten op the
patched model dispatches, per phase of the run (warm-up step, recording step, pruned step, and
the selection inside it). Counts are exact for eager execution:

- kernels: ops that launch work (views, `empty` and other metadata ops excluded);
- bytes: what each kernel reads and writes, whole tensors, except that an indexed write
  (`scatter_`, `index_copy_`, `copy_` into a slice) moves only its source's size;
- FLOPs: torch's flop counter; attention is routed to the flash kernel as on a GPU.

`catpatch census` prints it; `census()` returns it for tests. Check a change here before any GPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .config import CATConfig

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention"}
# Ops that only allocate or relabel memory: no kernel does work.
FREE_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "scalar_tensor", "lift_fresh",
    "_unsafe_view", "detach", "alias",
}  # fmt: skip
BUDGETED_STEPS = 10  # steps of a budgeted census run (its plan has anchor steps early)
INDEXED_WRITES = {"scatter_", "scatter_add_", "scatter_reduce_", "index_copy_", "index_put_"}


@dataclass
class PhaseCount:
    """What one phase of a step dispatched."""

    kernels: int = 0
    gemm_kernels: int = 0
    bytes: int = 0
    gemm_bytes: int = 0
    flops: int = 0
    ops: Counter = field(default_factory=Counter)  # kernels by op name
    op_bytes: Counter = field(default_factory=Counter)  # bytes by op name

    @property
    def other_bytes(self) -> int:
        """Bytes moved by the kernels that are not matrix products (the memory-bound part)."""
        return self.bytes - self.gemm_bytes


@dataclass
class Census:
    shape: str
    height: int
    width: int
    rows: int
    config: CATConfig
    full: PhaseCount
    record: PhaseCount
    pruned: PhaseCount  # the whole pruned step, selection included
    selection: PhaseCount  # the selection alone (inside the pruned step)
    cache_bytes: int

    def table(self) -> str:
        head = f"{'phase':<10}{'kernels':>9}{'GEMM':>7}{'bytes GB':>10}{'non-GEMM GB':>13}"
        head += f"{'TFLOP':>8}"
        lines = [head]
        for name in ("full", "record", "pruned", "selection"):
            c: PhaseCount = getattr(self, name)
            lines.append(
                f"{name:<10}{c.kernels:>9}{c.gemm_kernels:>7}{c.bytes / 1e9:>10.2f}"
                f"{c.other_bytes / 1e9:>13.2f}{c.flops / 1e12:>8.2f}"
            )
        full, pruned = self.full, self.pruned
        lines.append(
            f"pruned/full: kernels {pruned.kernels / full.kernels:.3f}, non-GEMM bytes "
            f"{pruned.other_bytes / full.other_bytes:.3f}, FLOPs {pruned.flops / full.flops:.3f}; "
            f"caches {self.cache_bytes / 1e9:.2f} GB"
        )
        return "\n".join(lines)


def _bytes(x: Any) -> int:
    """Distinct bytes a kernel touches in `x`: a broadcast (stride-0) dimension counts once."""
    if isinstance(x, torch.Tensor):
        size = 1
        for extent, stride in zip(x.shape, x.stride(), strict=True):
            size *= extent if stride else 1
        return size * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(t) for t in x)
    return 0


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, PhaseCount] = {}
        self.phases: list[str] = []  # the step's phase, and "selection" while inside it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in FREE_OPS:
            return out
        inputs = list(args) + list(kwargs.values())
        if name in INDEXED_WRITES or (name == "copy_" and not inputs[0].is_contiguous()):
            # reads index and source, writes the source's size into the buffer
            moved = sum(_bytes(a) for a in inputs[1:]) + _bytes(inputs[-1])
        elif name.endswith("_"):  # in place: read and write self, read the others
            moved = 2 * _bytes(inputs[0]) + sum(_bytes(a) for a in inputs[1:])
        else:
            moved = sum(_bytes(a) for a in inputs) + _bytes(out)
        for phase in self.phases:
            count = self.counts.setdefault(phase, PhaseCount())
            count.kernels += 1
            count.bytes += moved
            count.ops[name] += 1
            count.op_bytes[name] += moved
            if name in GEMM_OPS:
                count.gemm_kernels += 1
                count.gemm_bytes += moved
        return out


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value)[0]


def census(
    shape: str = "sd3-medium",
    height: int = 1024,
    width: int = 1024,
    config: CATConfig | None = None,
    batch: int = 1,
    cfg: bool = True,
    text_tokens: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Census:
    """Count a full, a recording and a pruned step of the named shape on the meta device
    (`text_tokens` None: what the family's pipelines pass, 333 for SD3, 512 for FLUX, 300 for
    PixArt-Σ).

    A family whose pipelines do not batch CFG (`adapter.batched_cfg` False, FLUX.1: B rows per
    call, true CFG as a second call counted the same) ignores `cfg`."""
    from .models.shapes import build_transformer
    from .patching import apply_cat, cat_generation, get_patch
    from .schedule import Mode

    config = config or CATConfig(selection="cat")
    model = build_transformer(shape, device="meta", dtype=dtype)
    recorder = _Recorder()
    budgeted = config.budgeted
    if budgeted:  # its computed steps record: the full step is the unpatched model's
        from .families import family_of

        family = family_of(model).adapter_class()
        cfg_rows = cfg and family.batched_cfg
        full_inputs = family.example_inputs(
            model.config, 2 * batch if cfg_rows else batch, height, width,
            text_tokens or family.text_tokens, device="meta", dtype=dtype,
        )  # fmt: skip
        original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _flash_sdpa
        try:
            counter = FlopCounterMode(display=False)
            recorder.phases = ["full"]
            with torch.no_grad(), counter, recorder:
                model(**full_inputs)
        finally:
            F.scaled_dot_product_attention = original
        recorder.counts["full"].flops = counter.get_total_flops()
    apply_cat(model, config)
    patch = get_patch(model)
    state = patch.state
    adapter = patch.adapter
    text_tokens = text_tokens or adapter.text_tokens
    cfg = cfg and adapter.batched_cfg
    rows = 2 * batch if cfg else batch
    inputs = adapter.example_inputs(
        model.config, rows, height, width, text_tokens, device="meta", dtype=dtype
    )
    next_selection = state.tokens.next

    def tagged_selection(*args, **kwargs):
        recorder.phases.append("selection")
        try:
            return next_selection(*args, **kwargs)
        finally:
            recorder.phases.pop()

    state.tokens.next = tagged_selection
    # a budgeted run plans its own steps: run until a recording and a pruned (anchor) step ran
    steps = config.warmup_steps + 1 if not budgeted else BUDGETED_STEPS
    flops: dict[str, int] = {}
    original_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        with torch.no_grad(), cat_generation(model, steps + 1, cfg=cfg):
            for _ in range(steps):
                counter = FlopCounterMode(display=False)
                recorder.phases = ["step"]
                with counter, recorder:
                    model(**inputs)
                mode = state.log.steps[-1].mode
                phase = {Mode.PRUNED: "pruned", Mode.RECORD: "record"}.get(mode, "full")
                step_count = recorder.counts.pop("step")
                if phase not in flops:  # the first step of each phase
                    recorder.counts[phase] = step_count
                    flops[phase] = counter.get_total_flops()
                if {"record", "pruned"} <= set(flops):
                    break
            cache_bytes = state.cache_bytes()
    finally:
        F.scaled_dot_product_attention = original_sdpa
        with contextlib.suppress(AttributeError):
            del state.tokens.next
    counts = recorder.counts
    if budgeted:
        flops["full"] = counts["full"].flops
    for phase, total in flops.items():
        counts[phase].flops = total
    return Census(
        shape, height, width, rows, config, counts["full"], counts["record"], counts["pruned"],
        counts.get("selection", PhaseCount()), cache_bytes,
    )  # fmt: skip
