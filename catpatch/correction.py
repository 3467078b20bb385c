"""Cluster-anchored correction of a forecast step (`CATConfig(macs=B, anchors=k)`).

On a forecast step of a budgeted run a few anchor tokens per CAT cluster are computed through
the pruned-step machinery; each anchor's computed output minus its forecast is the forecast's
error there. Every token of the cluster moves by the cluster's mean error, scaled by a gain
that trusts the mean as far as its anchors agree (positive-part James-Stein shrinkage: with
k >= 2 anchors, gain = 1 - (spread of the anchors' errors / k) / |mean error|², clamped to
[0, 1]; with one anchor, 1), times `CATConfig.anchor_gain`. Anchors keep their computed output.

Plain tensor code, static shapes, no host syncs: a handful of scatter/gather kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .caches import gather_tokens, rows_index, write_rows


def cluster_correction(
    forecast: Tensor,
    computed: Tensor,
    index: Tensor,
    image_rows: Tensor,
    labels: Tensor,
    num_clusters: int,
    gain: float = 1.0,
) -> Tensor:
    """The corrected output (R, L, F) of a forecast step.

    `forecast` (R, L, F): every token's forecast; `computed` (R, S, F): the anchors' computed
    outputs; `index` (R, S): which tokens the anchors are, `image_rows` (R·S,) their rows in
    the flattened (R·L, F) output; `labels` (R, L): each token's cluster (< `num_clusters`)."""
    rows, _, features = forecast.shape
    error = computed.float() - gather_tokens(forecast, index).float()  # (R, S, F)
    anchor_labels = labels.gather(1, index)  # (R, S)
    spread = rows_index(anchor_labels, error.shape)
    sums = error.new_zeros(rows, num_clusters, features).scatter_add_(1, spread, error)
    counts = error.new_zeros(rows, num_clusters).scatter_add_(
        1, anchor_labels, torch.ones_like(anchor_labels, dtype=error.dtype)
    )
    mean = sums / counts.clamp(min=1).unsqueeze(-1)  # (R, C, F)
    trust = _agreement(error, mean, anchor_labels, counts)  # (R, C)
    shift = mean * (gain * trust).unsqueeze(-1)
    result = forecast.float() + gather_tokens(shift, labels)  # each token's cluster's shift
    write_rows(result, image_rows, computed.float())
    return result.to(forecast.dtype)


def _agreement(error: Tensor, mean: Tensor, anchor_labels: Tensor, counts: Tensor) -> Tensor:
    """Per cluster, how far its mean error can be trusted: 1 - var(mean) / |mean|², in [0, 1]
    (1 for a cluster with one anchor, 0 for one with none)."""
    deviation = error - gather_tokens(mean, anchor_labels)
    squares = deviation.square().sum(-1)  # (R, S)
    spread = torch.zeros_like(counts).scatter_add_(1, anchor_labels, squares)
    variance_of_mean = spread / (counts * (counts - 1)).clamp(min=1)
    signal = mean.square().sum(-1)
    trust = (1 - variance_of_mean / signal.clamp(min=1e-30)).clamp(0, 1)
    trust = torch.where(counts > 1, trust, torch.ones_like(trust))
    return torch.where(counts > 0, trust, torch.zeros_like(trust))
