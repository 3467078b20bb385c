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
    """In place: f <- decay·f, then f[T_s] += 1 (the tokens in `index` were just recomputed;
    a selection holds no duplicates, so each gets exactly one 1 added)."""
    return recency.mul_(decay).scatter_(1, index, 1.0, reduce="add")


def ranks(key: Tensor, descending: bool) -> Tensor:
    """Rank of each entry along the last dim (0 = first in order); ties keep index order."""
    order = torch.sort(key, dim=-1, descending=descending, stable=True).indices
    return _inverse(order)


def _inverse(perm: Tensor) -> Tensor:
    positions = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, positions)


def lexi_ranks(primary: Tensor, secondary: Tensor, by_secondary: Tensor | None = None) -> Tensor:
    """Ranks by `primary` ascending, ties broken by `secondary` descending, then index.
    `by_secondary`: the stable descending order of `secondary`, when the caller has it."""
    if by_secondary is None:
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

    `key` (..., L) may hold several keys per group (leading dims before labels' (G, L)); each
    is ranked on its own. (..., L) -> (..., L). `num_clusters` is not needed (kept for callers).
    """
    order = torch.sort(key, dim=-1, descending=descending, stable=True).indices
    return ranks_in_clusters(order, labels)


def ranks_in_clusters(order: Tensor, labels: Tensor) -> Tensor:
    """Each token's rank among the tokens of its own cluster in `order` (..., L), the tokens
    sorted by some key (labels (G, L) broadcast over the leading dims).

    A stable sort by cluster keeps the key order inside each cluster; a token's rank is its
    position there minus its cluster's first position (a `searchsorted` of the sorted labels
    in themselves). Integer ops only.
    """
    grouped_labels, regroup = torch.sort(
        labels.expand_as(order).gather(-1, order), dim=-1, stable=True
    )
    grouped = order.gather(-1, regroup)
    starts = torch.searchsorted(grouped_labels, grouped_labels)
    positions = torch.arange(order.shape[-1], device=order.device)
    return torch.empty_like(grouped).scatter_(-1, grouped, positions - starts)


def take_smallest(key: Tensor, budget: int) -> Tensor:
    """Indices of the `budget` smallest keys per row, sorted ascending by token index."""
    index = torch.topk(key, budget, dim=1, largest=False, sorted=False).indices
    return torch.sort(index, dim=1).values
