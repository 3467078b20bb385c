"""Which tokens a pruned step recomputes: pure tensor code, static shapes, no host syncs.

All functions take batched tensors with a leading group dimension G (one selection per group:
a sample, or a CFG pair sharing its conditional row) and L image tokens, and return token
indices of shape (G, S), sorted ascending, without duplicates. No function reads a tensor value
on the host, so the whole selection runs on the model's device and traces with
`torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import math

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


def _lexi_ranks(primary: Tensor, secondary: Tensor) -> Tensor:
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


def _take_smallest(key: Tensor, budget: int) -> Tensor:
    """Indices of the `budget` smallest keys per row, sorted ascending by token index."""
    index = torch.topk(key, budget, dim=1, largest=False, sorted=False).indices
    return torch.sort(index, dim=1).values


def first_selection(
    delta: Tensor, cluster_score: Tensor, labels: Tensor, budget: int, quota: int
) -> Tensor:
    """The selection for the first pruned step (made at step t0-1).

    Walks the clusters from the highest score down and takes from each its `quota` tokens of
    largest drift, until `budget` tokens are taken; if the clusters run out first (small
    clusters), the rest are the largest-drift tokens left anywhere.
    """
    num_tokens = labels.shape[1]
    num_clusters = cluster_score.shape[1]
    token_cluster_rank = ranks(cluster_score, descending=True).gather(1, labels)
    drift_rank = rank_within_clusters(delta, labels, num_clusters, descending=True)
    walk = token_cluster_rank * num_tokens + drift_rank
    leftover = num_clusters * num_tokens + ranks(delta, descending=True)
    return _take_smallest(torch.where(drift_rank < quota, walk, leftover), budget)


def cluster_quotas(num_clusters: int, budget: int, quota_unit: float) -> tuple[list[int], int]:
    """Per-cluster-rank drift quotas (3k, 2k, k, k, ...) and the recency quota k/2."""
    k = max(1, round(quota_unit * budget))
    quotas = [3 * k, 2 * k] + [k] * max(0, num_clusters - 2)
    return quotas[:num_clusters], max(1, k // 2)


def cat_selection(
    delta: Tensor,
    cluster_score: Tensor,
    labels: Tensor,
    recency: Tensor,
    budget: int,
    cluster_budget: int,
    quotas: Tensor,
    recency_quota: int,
) -> Tensor:
    """CAT's selection for the next pruned step: cluster quota, then staleness, padded to S.

    1. Cluster quota (`cluster_budget` ≈ 0.25·S): walking clusters from the best score down,
       take each cluster's top-drift tokens (quota 3k, 2k, k, ...), and from every cluster but
       the first its k/2 least recently computed tokens; stop after `cluster_budget` picks.
       `quotas` (C,) holds the drift quota by cluster rank, `recency_quota` k/2 (see
       `cluster_quotas`).
    2. Staleness: the least recently computed tokens over the whole image (ties: larger drift
       first), until exactly `budget` distinct tokens are selected.
    """
    num_tokens = labels.shape[1]
    num_clusters = cluster_score.shape[1]
    token_cluster_rank = ranks(cluster_score, descending=True).gather(1, labels)
    token_quota = quotas[token_cluster_rank]
    drift_rank = rank_within_clusters(delta, labels, num_clusters, descending=True)
    stale_rank = rank_within_clusters(recency, labels, num_clusters, descending=False)

    # Walk order as one integer key: cluster rank, then drift picks, then recency picks.
    never = 2 * num_tokens * (num_clusters + 1)
    walk_base = token_cluster_rank * (2 * num_tokens)
    by_drift = torch.where(drift_rank < token_quota, walk_base + drift_rank, never)
    by_recency = torch.where(
        (stale_rank < recency_quota) & (token_cluster_rank > 0),
        walk_base + num_tokens + stale_rank,
        never,
    )
    walk = torch.minimum(by_drift, by_recency)

    stalest = _lexi_ranks(recency, delta)
    if cluster_budget > 0:
        # Keys are distinct, so the cluster_budget-th smallest is an exact cut.
        cut = torch.kthvalue(walk, min(cluster_budget, num_tokens), dim=1, keepdim=True).values
        picked = (walk <= cut) & (walk < never)
        key = torch.where(picked, -1, stalest)
    else:
        key = stalest
    return _take_smallest(key, budget)


def stale_selection(recency: Tensor, budget: int) -> Tensor:
    """Round robin: the `budget` least recently computed tokens (ties: lower index first)."""
    return _take_smallest(ranks(recency, descending=False), budget)


def noise_selection(delta: Tensor, budget: int) -> Tensor:
    """Drift only: the `budget` tokens whose output moved furthest from the reference."""
    return _take_smallest(ranks(delta, descending=True), budget)


def random_selection(
    groups: int, num_tokens: int, budget: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """`budget` tokens drawn uniformly without replacement for each group."""
    noise = torch.rand(groups, num_tokens, generator=generator, device=device)
    return _take_smallest(noise, budget)


def first_quota_size(budget: int, fraction: float) -> int:
    """Per-cluster quota of the first selection (about S/10 with the default fraction)."""
    return max(1, math.ceil(fraction * budget))
