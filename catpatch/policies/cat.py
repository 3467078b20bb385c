"""CAT's own selection ("cat"): cluster-aware drift picks plus staleness, the paper's rule.

At step t0-1 the token grid is clustered once (position-coded k-means, `clustering.py`), the
cluster scores are smoothed over the cluster graph, and the first selection walks the best
clusters for their top-drift tokens. On every pruned step after that, about 25% of S goes to the
top-drift tokens of the best clusters (quotas 3k, 2k, k, ...) with a few least-recent tokens per
cluster, and the rest to the least recently computed tokens of the whole image, padded to
exactly S (see `cat_selection`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from ..caches import static_tensor
from . import clustering, ranking
from .base import DriftPolicy, RecencyPolicy


def cluster_quotas(num_clusters: int, budget: int, quota_unit: float) -> tuple[list[int], int]:
    """Per-cluster-rank drift quotas (3k, 2k, k, k, ...) and the recency quota k/2."""
    k = max(1, round(quota_unit * budget))
    quotas = [3 * k, 2 * k] + [k] * max(0, num_clusters - 2)
    return quotas[:num_clusters], max(1, k // 2)


def first_quota_size(budget: int, fraction: float) -> int:
    """Per-cluster quota of the first selection (about S/10 with the default fraction)."""
    return max(1, math.ceil(fraction * budget))


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
    token_cluster_rank = ranking.ranks(cluster_score, descending=True).gather(1, labels)
    drift_rank = ranking.rank_within_clusters(delta, labels, num_clusters, descending=True)
    walk = token_cluster_rank * num_tokens + drift_rank
    leftover = num_clusters * num_tokens + ranking.ranks(delta, descending=True)
    return ranking.take_smallest(torch.where(drift_rank < quota, walk, leftover), budget)


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
    table = walk_table(quotas, recency_quota, labels.shape[1])
    return select_by_walk(delta, cluster_score, labels, recency, budget, cluster_budget, table)


def walk_table(quotas: Tensor, recency_quota: int, num_tokens: int) -> Tensor:
    """Per cluster rank (C columns), what `select_by_walk` looks up for each token: its drift
    quota, its recency quota (k/2; 0 for the best cluster), and the walk keys its drift and
    recency picks start from (rank·2L and rank·2L + L). (C,) quotas -> (4, C)."""
    rank = torch.arange(quotas.shape[0], device=quotas.device)
    base = rank * (2 * num_tokens)
    recency = torch.where(rank > 0, recency_quota, 0)
    return torch.stack([quotas.to(rank.dtype), recency, base, base + num_tokens])


def select_by_walk(
    delta: Tensor,
    cluster_score: Tensor,
    labels: Tensor,
    recency: Tensor,
    budget: int,
    cluster_budget: int,
    table: Tensor,
) -> Tensor:
    """`cat_selection` with its per-cluster-rank `table` (`walk_table`) built beforehand.

    The walk as one integer key per token: cluster rank, then drift picks, then recency
    picks; drift and recency ranks are computed together, as two keys of one sort.
    """
    num_tokens = labels.shape[1]
    never = 2 * num_tokens * (cluster_score.shape[1] + 1)
    token_cluster_rank = ranking.ranks(cluster_score, descending=True).gather(1, labels)
    per_token = table[:, token_cluster_rank]  # (4, G, L): quotas, then walk bases
    # drift descending and recency ascending (as -recency descending: recency is never NaN)
    order = torch.sort(torch.stack([delta, recency.neg()]), dim=-1, descending=True, stable=True)
    order = order.indices
    ranks = ranking.ranks_in_clusters(order, labels)  # (2, G, L): drift rank, stale rank
    walk = torch.where(ranks < per_token[:2], ranks + per_token[2:], never).amin(0)

    stalest = ranking.lexi_ranks(recency, delta, by_secondary=order[0])
    if cluster_budget > 0:
        # Keys are distinct, so the cluster_budget-th smallest is an exact cut; a cut at
        # `never` (fewer walk picks than cluster_budget) takes only the walk picks.
        cut = torch.kthvalue(walk, min(cluster_budget, num_tokens), dim=1, keepdim=True).values
        key = torch.where(walk <= cut.clamp_(max=never - 1), -1, stalest)
    else:
        key = stalest
    return ranking.take_smallest(key, budget)


class CatPolicy(DriftPolicy, RecencyPolicy):
    name = "cat"
    grid_neighbours: ClassVar[int] = 8  # the token-grid graph the cluster adjacency is read on

    def __init__(self, config, persistent: bool = False):
        super().__init__(config, persistent)
        self._grids: dict[tuple, clustering.GridGeometry] = {}  # kept across runs

    def prepare(self, geometry, budget: int) -> None:
        super().prepare(geometry, budget)
        cfg = self.config
        if cfg.num_clusters > geometry.tokens:
            raise ValueError(
                f"num_clusters={cfg.num_clusters} exceeds the {geometry.tokens} image tokens "
                f"of this call ({geometry.height}x{geometry.width} token grid); lower "
                f"CATConfig.num_clusters or generate at a larger resolution"
            )
        # Built here, outside any compiled region: the grid graph has data-dependent shape,
        # and the quota table would be a host-to-device copy on every step.
        self.grid = self._grid(geometry)
        quotas, self.recency_quota = cluster_quotas(cfg.num_clusters, budget, cfg.cluster_quota)
        self.quotas = self.keep(self.quotas, torch.tensor(quotas, device=geometry.device))
        table = walk_table(self.quotas, self.recency_quota, geometry.tokens)
        self.walk_table = self.keep(self.walk_table, table)

    def allocate(self, groups: int, geometry, budget: int, features: int) -> None:
        super().allocate(groups, geometry, budget, features)
        self.labels = static_tensor((groups, geometry.tokens), torch.long, geometry.device)
        self.cluster_index = static_tensor((groups * geometry.tokens,), torch.long, geometry.device)

    def first(self, output: Tensor) -> Tensor:
        cfg, grid = self.config, self.grid
        self.reset_recency(output)
        features = clustering.cluster_features(output, grid.position, cfg.cluster_feature_scale)
        labels = clustering.kmeans(features, grid.init, cfg.kmeans_iters)
        self.labels = self.keep(self.labels, labels)
        index = clustering.flat_cluster_index(self.labels, cfg.num_clusters)
        self.cluster_index = self.keep(self.cluster_index, index)
        diff, delta = self.drift(output)
        score = clustering.cluster_scores(diff, self.labels, cfg.num_clusters)
        adjacency = clustering.cluster_adjacency(self.labels, grid.edges, cfg.num_clusters)
        smoothed = clustering.smooth_scores(score, adjacency)
        quota = first_quota_size(self.budget, cfg.first_quota)
        return first_selection(delta, smoothed, self.labels, self.budget, quota)

    def next(self, output: Tensor, computed: Tensor) -> Tensor:
        self.update_recency(computed)
        diff, delta = self.drift(output)
        score = clustering.cluster_scores(
            diff, self.labels, self.config.num_clusters, self.cluster_index
        )
        return self.rule(delta, score, int(self.config.cluster_fraction * self.budget))

    def rule(self, delta: Tensor, score: Tensor, cluster_budget: int) -> Tensor:
        """The per-step selection from Δ (G, L) and the cluster scores (G, C)."""
        return select_by_walk(
            delta, score, self.labels, self.recency, self.budget, cluster_budget, self.walk_table
        )

    def free(self) -> None:
        super().free()
        self.labels: Tensor | None = None  # (G, L) cluster of each token
        self.cluster_index: Tensor | None = None  # (G·L,) its flat index (g·C + label)
        self.quotas: Tensor | None = None  # (C,) drift quota by cluster rank
        self.walk_table: Tensor | None = None  # (4, C) see `walk_table`
        self.recency_quota = 0

    def _grid(self, geometry) -> clustering.GridGeometry:
        clusters, neighbours = self.config.num_clusters, self.grid_neighbours
        key = (geometry.height, geometry.width, clusters, neighbours, str(geometry.device))
        if key not in self._grids:
            self._grids[key] = clustering.GridGeometry.build(
                geometry.height, geometry.width, clusters, geometry.device, neighbours
            )
        return self._grids[key]
