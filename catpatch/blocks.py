"""Helpers every family's pruned blocks share: output caches and K/V projections in place."""

from __future__ import annotations

import torch
from torch import Tensor

from .caches import BlockCache, StepIndex, write_rows


def store(
    cache: BlockCache, name: str, values: Tensor, step: StepIndex | None, rows: slice, keep_all
) -> Tensor:
    """Keep the driver rows' (`rows`) image output `values` in `cache.name` (all tokens at the
    recording step, the computed ones in place on a pruned step); -> the cache."""
    if step is None:
        setattr(cache, name, keep_all(getattr(cache, name), values[rows]))
    else:
        write_rows(getattr(cache, name), step.out, values[rows])
    return getattr(cache, name)


def linear_into(linear, x: Tensor, out: Tensor) -> bool:
    """Compute `linear(x)` into `out` (a contiguous (R·N, D_out) slice) with the very op that
    `F.linear` runs for a contiguous (R, N, D) input: `addmm(bias, x.view(-1, D), W.t())`,
    here with `out=`, so the values are the same. False, and nothing computed, when `linear`
    is not a plain `nn.Linear` with a bias (LoRA layers, hooks, ...) or autograd needs the
    result: the caller then calls the module."""
    weight, bias = getattr(linear, "weight", None), getattr(linear, "bias", None)
    plain = (
        type(linear) is torch.nn.Linear
        and bias is not None
        and not ("forward" in vars(linear) or linear._forward_hooks or linear._forward_pre_hooks)
        and x.is_contiguous()
        and x.dtype == weight.dtype == bias.dtype == out.dtype
    )
    if not plain or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return False
    torch.addmm(bias, x.view(-1, x.shape[-1]), weight.t(), out=out)
    return True
