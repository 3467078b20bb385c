"""The reference's own selection ("paper"): CAT as the authors' code selects, rule by rule.

§7 of the design notes (`cat-pruning.md`, "The reference's selection, rule by rule") lists
where the reference's selection differs from catpatch's "cat"; this policy follows the
reference column:

- k-means features: 0.05·n_t with the position code **added into** the channels (row/H' to the
  first half, col/W' to the second), so clusters are compact spatial blobs
  (`clustering.cluster_features(combine="add")`);
- first-selection cluster scores: per channel, over the 4-neighbour cluster graph with self
  loops, mean + sum + max of the pooled channel maxima, then the L2 norm — what the
  reference's torch-geometric aggregation computes as it runs, though its code reads as
  2·mean + max (`clustering.smooth_channel_maxima`);
- quota floors: ⌊S/10⌋ per cluster at the first selection, quota unit k = ⌊⌊S/5⌋·0.25⌋;
- within-cluster balance: every cluster after the first gives its top-Δ quota k_i (3k, 2k, k,
  ...) **united** with its ⌊k_i/2⌋ least recently computed tokens, the union in token-index
  order, and the walk over clusters is cut at 0.25·S (`paper_selection`);
- Δ on pruned steps from the model's fresh dense estimate of every token (`lean=False`, set by
  `CATConfig.paper()`), not the unselected tokens' last computed output.

Kept from catpatch (the reference cannot do these): device-side k-means (farthest-point start,
fixed Lloyd iterations), padding to exactly S with the next-stalest tokens (static shapes),
deterministic ties (larger Δ first, then lower index) and Δ in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import clustering, ranking
from .cat import CatPolicy, first_selection

_EPS = 1e-9  # float products such as 0.1·S land exactly on integers: floor them safely


def paper_quotas(num_clusters: int, budget: int, quota_unit: float) -> tuple[list[int], list[int]]:
    """The reference's per-cluster-rank quotas: drift quotas k_i = 3k, 2k, k, k, ... with
    k = ⌊⌊S/5⌋·0.25⌋ (`quota_unit` 0.05 = 0.25/5), and least-recent quotas ⌊k_i/2⌋ for every
    cluster but the first (0 for it)."""
    k = max(1, math.floor((budget // 5) * 5 * quota_unit + _EPS))
    drift = ([3 * k, 2 * k] + [k] * max(0, num_clusters - 2))[:num_clusters]
    recent = [0] + [q // 2 for q in drift[1:]]
    return drift, recent


def paper_first_quota(budget: int, fraction: float) -> int:
    """Per-cluster quota of the first selection: ⌊S/10⌋ (with the default fraction 0.1)."""
    return max(1, math.floor(fraction * budget + _EPS))


def paper_selection(
    delta: Tensor,
    cluster_score: Tensor,
    labels: Tensor,
    recency: Tensor,
    budget: int,
    cluster_budget: int,
    quotas: Tensor,
    recent_quotas: Tensor,
) -> Tensor:
    """The reference's selection for the next pruned step, padded to exactly S.

    1. Cluster share (`cluster_budget` = 0.25·S): walk the clusters from the best score down;
       each contributes the union of its `quotas[rank]` top-drift tokens and its
       `recent_quotas[rank]` least recently computed tokens, in token-index order; the walk
       stops after `cluster_budget` tokens (cutting the last cluster's union by index).
    2. Staleness: the least recently computed tokens over the whole image (ties: larger drift
       first, then lower index) until exactly `budget` distinct tokens are selected.

    Least-recent ties inside a cluster are broken the same way. (G, L) inputs -> (G, S).
    """
    num_tokens = labels.shape[1]
    num_clusters = cluster_score.shape[1]
    token_cluster_rank = ranking.ranks(cluster_score, descending=True).gather(1, labels)
    drift_rank = ranking.rank_within_clusters(delta, labels, num_clusters, descending=True)
    stalest = ranking.lexi_ranks(recency, delta)
    stale_rank = ranking.rank_within_clusters(stalest, labels, num_clusters, descending=False)
    member = (drift_rank < quotas[token_cluster_rank]) | (
        stale_rank < recent_quotas[token_cluster_rank]
    )
    # Walk order as one integer key: cluster rank, then token index (the union's order).
    never = num_tokens * (num_clusters + 1)
    index = torch.arange(num_tokens, device=labels.device)
    walk = torch.where(member, token_cluster_rank * num_tokens + index, never)
    if cluster_budget > 0:
        # Keys are distinct, so the cluster_budget-th smallest is an exact cut.
        cut = torch.kthvalue(walk, min(cluster_budget, num_tokens), dim=1, keepdim=True).values
        key = torch.where((walk <= cut) & member, -1, stalest)
    else:
        key = stalest
    return ranking.take_smallest(key, budget)


class PaperPolicy(CatPolicy):
    """CAT's selection as the reference computes it (see the module docstring); the state
    (reference output, recency counter, labels) and grid handling are `CatPolicy`'s."""

    name = "paper"
    grid_neighbours = 4

    def prepare(self, geometry, budget: int) -> None:
        super().prepare(geometry, budget)
        quotas, recent = paper_quotas(self.config.num_clusters, budget, self.config.cluster_quota)
        self.quotas = self.keep(self.quotas, torch.tensor(quotas, device=geometry.device))
        self.recent_quotas = self.keep(
            self.recent_quotas, torch.tensor(recent, device=geometry.device)
        )

    def first(self, output: Tensor) -> Tensor:
        cfg, grid = self.config, self.grid
        self.reset_recency(output)
        features = clustering.cluster_features(
            output, grid.position, cfg.cluster_feature_scale, combine="add"
        )
        labels = clustering.kmeans(features, grid.init, cfg.kmeans_iters)
        self.labels = self.keep(self.labels, labels)
        diff, delta = self.drift(output)
        maxima = clustering.cluster_maxima(diff, self.labels, cfg.num_clusters)
        adjacency = clustering.cluster_adjacency(
            self.labels, grid.edges, cfg.num_clusters, self_loops=True
        )
        smoothed = clustering.smooth_channel_maxima(maxima, adjacency)
        quota = paper_first_quota(self.budget, cfg.first_quota)
        return first_selection(delta, smoothed, self.labels, self.budget, quota)

    def rule(self, delta: Tensor, score: Tensor, cluster_budget: int) -> Tensor:
        return paper_selection(
            delta, score, self.labels, self.recency, self.budget, cluster_budget, self.quotas,
            self.recent_quotas,
        )  # fmt: skip

    def free(self) -> None:
        super().free()
        self.recent_quotas: Tensor | None = None  # (C,) least-recent quota by cluster rank
