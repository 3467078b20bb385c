"""Ranking primitives the token policies share: pure tensor code, static shapes, no host syncs.

Every function takes batched tensors with a leading group dimension G (one selection per group:
a sample, or a CFG pair sharing its conditional row) and L image tokens; a selection is token
indices of shape (G, S), sorted ascending, without duplicates (`take_smallest`). No function
reads a tensor value on the host, so a policy built from them runs on the model's device and
traces with `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def drift(diff: Tensor) -> Tensor:
    """Δ: per-token L2 norm of `diff` = output - reference (the caller forms it once, in
    float32, since the cluster scores read it too). (G, L, F) -> (G, L)."""
    return diff.norm(dim=-1)


def update_recency(recency: Tensor, index: Tensor, decay: float) -> Tensor:
    """In place: f <- decay·f, then f[T_s] += 1 (the tokens in `index` were just recomputed)."""
    ones = torch.ones(1, 1, dtype=recency.dtype, device=recency.device).expand_as(index)
    return recency.mul_(decay).scatter_add_(1, index, ones)


def ranks(key: Tensor, descending: bool) -> Tensor:
    """Rank of each entry along the last dim (0 = first in order); ties keep index order."""
    order = torch.sort(key, dim=-1, descending=descending, stable=True).indices
    return _inverse(order)


def _inverse(perm: Tensor) -> Tensor:
    positions = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, positions)


def lexi_ranks(primary: Tensor, secondary: Tensor) -> Tensor:
    """Ranks by `primary` ascending, ties broken by `secondary` descending, then index."""
    by_secondary = torch.sort(secondary, dim=-1, descending=True, stable=True).indices
    by_primary = torch.sort(primary.gather(-1, by_secondary), dim=-1, stable=True).indices
    return _inverse(by_secondary.gather(-1, by_primary))


def cluster_sizes(labels: Tensor, num_clusters: int) -> Tensor:
    """Tokens per cluster. (G, L) -> (G, C)."""
    sizes = torch.zeros(labels.shape[0], num_clusters, dtype=torch.long, device=labels.device)
    return sizes.scatter_add_(1, labels, torch.ones_like(labels))


def rank_within_clusters(
    key: Tensor, labels: Tensor, num_clusters: int, descending: bool
) -> Tensor:
    """Rank of each token among the tokens of its own cluster, ordered by `key`.

    Two stable sorts group the tokens by cluster while keeping the key order inside each
    cluster; a token's rank is its position minus its cluster's start. (G, L) -> (G, L).
    """
    order = torch.sort(key, dim=1, descending=descending, stable=True).indices
    regroup = torch.sort(labels.gather(1, order), dim=1, stable=True).indices
    grouped = order.gather(1, regroup)
    sizes = cluster_sizes(labels, num_clusters)
    starts = sizes.cumsum(1) - sizes
    positions = torch.arange(key.shape[1], device=key.device).expand_as(grouped)
    rank_in_grouped = positions - starts.gather(1, labels.gather(1, grouped))
    return torch.empty_like(rank_in_grouped).scatter_(1, grouped, rank_in_grouped)


def take_smallest(key: Tensor, budget: int) -> Tensor:
    """Indices of the `budget` smallest keys per row, sorted ascending by token index."""
    index = torch.topk(key, budget, dim=1, largest=False, sorted=False).indices
    return torch.sort(index, dim=1).values
