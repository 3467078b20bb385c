"""How unevenly the model output changes over the image tokens, step by step, unpatched.

CAT recomputes a fixed share of the tokens per step and reuses the rest; that pays if, late in
sampling, a few tokens carry most of the change of the model output, and if they are the same
tokens from step to step (or since the first selection). This module measures both on an
unpatched pipeline. Steps are 0-based as in the design notes; v_t (L, F) is the velocity per
image token at step t (the transformer output, each token the p·p·C values of its patch in
diffusers' un-patchify order, `patch_tokens`).

- **change** c_t = ‖v_t − v_{t−1}‖₂ per token, t ≥ 1 (`token_change`);
- **top share**: the fraction of Σ c_t carried by the ⌊f·L⌋ tokens of largest change (f = 0.3:
  CAT's budget S at α 0.3); change spread evenly gives ⌊f·L⌋/L ≈ f, change on those tokens
  only gives 1 (`top_share`);
- **step correlation**: Spearman ρ(c_t, c_{t−1}) over the tokens, t ≥ 2 (`rank_correlation`);
- **reference correlation**: ρ(c_t, c_{t0−1}), t0 the warm-up. c_{t0−1} = ‖v_{t0−1} − v_{t0−2}‖
  is exactly the drift Δ of CAT's first selection (reference output at step t0−2, first
  selection from step t0−1): whether the tokens that moved when CAT chose first still move.

Under classifier-free guidance the recorded velocity is, by default, the guided one the sampler
integrates, v = v_u + g·(v_c − v_u) (`rows="guided"`); `rows="cond"` takes the conditional row,
the one CAT's selection reads. Plain functions on tensors, plus `record_velocities`, which runs
the pipeline with a forward hook on its transformer (no skip-layer guidance: one transformer
call per step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

ROWS = ("guided", "cond")


# ---- tensor functions --------------------------------------------------------------------------
def patch_tokens(sample: Tensor, patch_size: int) -> Tensor:
    """Group a latent-shaped model output into image tokens: (B, C, H, W) -> (B, L, p·p·C),
    L = (H/p)·(W/p), each token's values in diffusers' un-patchify order (p, p, C)."""
    batch, channels, height, width = sample.shape
    p = patch_size
    grid = sample.reshape(batch, channels, height // p, p, width // p, p)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), -1)


def token_change(velocity: Tensor) -> Tensor:
    """c_t = ‖v_t − v_{t−1}‖₂ per token. (..., T, L, F) -> (..., T, L); step 0 is NaN (no
    previous step), so index t is step t."""
    velocity = velocity.float()
    change = torch.full(velocity.shape[:-1], math.nan, dtype=torch.float32)
    change[..., 1:, :] = (velocity[..., 1:, :, :] - velocity[..., :-1, :, :]).norm(dim=-1)
    return change


def top_count(num_tokens: int, fraction: float) -> int:
    """⌊fraction·L⌋ (at least 1): the token count of `top_share`, CAT's S at α = fraction."""
    return max(1, min(num_tokens, math.floor(fraction * num_tokens + 1e-9)))


def top_share(change: Tensor, fraction: float = 0.3) -> Tensor:
    """Share of the total change carried by the ⌊fraction·L⌋ tokens of largest change.
    (..., L) -> (...); NaN where nothing changed."""
    k = top_count(change.shape[-1], fraction)
    top = change.topk(k, dim=-1).values.sum(-1)
    return top / change.sum(-1)


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's ρ of `a` and `b` over the last dim (ties take their average rank; torchmetrics'
    `spearman_corrcoef`). (..., L), (..., L) -> (...)."""
    from torchmetrics.functional import spearman_corrcoef

    lead = a.shape[:-1]
    x = a.reshape(-1, a.shape[-1]).T.double()
    y = b.reshape(-1, b.shape[-1]).T.double()
    if x.shape[1] == 1:  # torchmetrics takes (N,) for one pair and (N, d) for d pairs
        x, y = x[:, 0], y[:, 0]
    return spearman_corrcoef(x, y).float().reshape(lead)


def relative_change(velocity: Tensor) -> Tensor:
    """Σ_tokens c_t / Σ_tokens ‖v_{t−1}‖: how much the output changes at all. (..., T, L, F) ->
    (..., T); step 0 is NaN."""
    change = token_change(velocity)
    size = velocity.float().norm(dim=-1)
    out = torch.full(change.shape[:-1], math.nan)
    out[..., 1:] = change[..., 1:, :].sum(-1) / size[..., :-1, :].sum(-1)
    return out


@dataclass
class StepStats:
    """The measures of one step t over the images: mean and standard error of each (None where
    undefined: step correlation needs t ≥ 2, reference correlation t ≥ t0)."""

    step: int
    pruned: bool  # t >= t0: a step CAT would prune
    top_share: tuple[float, float]
    step_rho: tuple[float, float] | None
    reference_rho: tuple[float, float] | None
    relative_change: tuple[float, float]

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "pruned": self.pruned}
        for name in ("top_share", "step_rho", "reference_rho", "relative_change"):
            value = getattr(self, name)
            out[name], out[f"{name}_se"] = value if value is not None else (None, None)
        return out


def _mean_se(x: Tensor) -> tuple[float, float]:
    x = x.double()
    se = float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else math.nan
    return float(x.mean()), se


def step_stats(velocity: Tensor, warmup_steps: int, fraction: float = 0.3) -> list[StepStats]:
    """Per step t = 1..T−1, the measures of the module docstring over the images.
    `velocity` (N, T, L, F): N images, T steps; `warmup_steps` t0 (≥ 2, < T)."""
    steps = velocity.shape[1]
    if not 2 <= warmup_steps < steps:
        raise ValueError(
            f"warmup_steps={warmup_steps}: must be in [2, {steps - 1}] for {steps} steps "
            f"(step t0-2 is CAT's reference, t0-1 its first selection)"
        )
    change = token_change(velocity)  # (N, T, L)
    share = top_share(change, fraction)  # (N, T)
    moved = relative_change(velocity)
    reference = change[:, warmup_steps - 1]
    stats = []
    for t in range(1, steps):
        step_rho = rank_correlation(change[:, t], change[:, t - 1]) if t >= 2 else None
        ref_rho = rank_correlation(change[:, t], reference) if t >= warmup_steps else None
        stats.append(
            StepStats(
                step=t,
                pruned=t >= warmup_steps,
                top_share=_mean_se(share[:, t]),
                step_rho=None if step_rho is None else _mean_se(step_rho),
                reference_rho=None if ref_rho is None else _mean_se(ref_rho),
                relative_change=_mean_se(moved[:, t]),
            )
        )
    return stats


def pruned_average(stats: Sequence[StepStats]) -> dict[str, float]:
    """Each measure's mean over the pruned steps (t ≥ t0) of `step_stats`."""
    pruned = [s for s in stats if s.pruned]
    return {
        name: float(np.mean([getattr(s, name)[0] for s in pruned]))
        for name in ("top_share", "step_rho", "reference_rho", "relative_change")
    }


def normalised_maps(change: Tensor, height: int, width: int) -> Tensor:
    """Change maps on the token grid, each scaled to [0, 1] by its own maximum.
    (..., L) -> (..., H', W')."""
    maps = change.reshape(*change.shape[:-1], height, width)
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp(min=1e-30), torch.zeros_like(maps))


# ---- recording ---------------------------------------------------------------------------------
@dataclass
class Recording:
    """Velocities of an unpatched run: `velocity` (N, T, L, F) float32 on the CPU, the final
    `images` (N, H, W, 3) in [0, 1], and the token `grid` (H', W')."""

    velocity: Tensor
    images: np.ndarray
    grid: tuple[int, int]


def record_velocities(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    rows: str = "guided",
    batch_size: int = 8,
    **call_kwargs: Any,
) -> Recording:
    """Run `pipe` (an unpatched SD3-family text-to-image pipeline) on `prompts`, image i from
    `torch.Generator().manual_seed(seeds[i])`, and record the transformer's output per call
    with a forward hook: per image token (`patch_tokens`), under CFG the guided combination
    (`rows="guided"`) or the conditional row (`rows="cond"`). `call_kwargs` go to the
    pipeline call (`num_inference_steps`, `height`, ...; not skip-layer guidance)."""
    from ..patching import is_patched

    if rows not in ROWS:
        raise ValueError(f"rows={rows!r}: must be one of {ROWS}")
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if is_patched(pipe):
        raise ValueError("record_velocities measures the unpatched model: remove_cat(pipe) first")
    if call_kwargs.get("skip_guidance_layers"):
        raise ValueError("skip-layer guidance calls the transformer twice per step: leave it off")
    transformer = pipe.transformer
    patch = int(transformer.config.patch_size)
    calls: list[Tensor] = []
    grid: list[tuple[int, int]] = []

    def hook(module, args, output) -> None:
        sample = output[0] if isinstance(output, tuple) else output.sample
        tokens = patch_tokens(sample.detach().float(), patch)
        if pipe.do_classifier_free_guidance:
            uncond, cond = tokens.chunk(2)
            tokens = cond if rows == "cond" else uncond + pipe.guidance_scale * (cond - uncond)
        calls.append(tokens.cpu())
        grid[:] = [(sample.shape[-2] // patch, sample.shape[-1] // patch)]

    velocities, images = [], []
    handle = transformer.register_forward_hook(hook)
    try:
        for i in range(0, len(prompts), batch_size):
            calls.clear()
            part = slice(i, i + batch_size)
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[part]]
            kwargs = {"output_type": "np", **call_kwargs}
            out = pipe(prompt=list(prompts[part]), generator=gens, **kwargs)
            expected = call_kwargs.get("num_inference_steps")
            if expected is not None and len(calls) != expected:
                raise RuntimeError(f"{len(calls)} transformer calls for {expected} steps")
            velocities.append(torch.stack(calls, dim=1))  # (B, T, L, F)
            images.append(np.asarray(out.images))
    finally:
        handle.remove()
    return Recording(torch.cat(velocities), np.concatenate(images), grid[0])
