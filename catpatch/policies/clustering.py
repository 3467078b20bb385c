"""Spatial clusters of the token grid: position-coded k-means and cluster-graph pooling.

Everything here runs on the model's device with static shapes. The token-grid graph comes from
torch-geometric (`utils.grid`); token features are pooled into clusters with its graph-pooling
ops (`max_pool_x`, `avg_pool_x`), which use torch-scatter when installed and torch's
`scatter_reduce` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch_geometric.nn.pool import avg_pool_x, max_pool_x
from torch_geometric.utils import grid, remove_self_loops


@dataclass
class GridGeometry:
    """What the clustering needs to know about a token grid; built once per resolution."""

    height: int
    width: int
    position: Tensor  # (L, 2): row / H', col / W'
    edges: Tensor  # (2, E): 8- (or 4-) neighbour grid edges, no self loops
    init: Tensor  # (C,): token indices of the initial centroids

    @classmethod
    def build(
        cls, height: int, width: int, num_clusters: int, device, neighbours: int = 8
    ) -> GridGeometry:
        """`neighbours` 8 (diagonals included) or 4 (edge-sharing tokens only)."""
        if neighbours not in (4, 8):
            raise ValueError(f"neighbours={neighbours!r}: must be 4 or 8")
        rows = torch.arange(height, dtype=torch.float32).repeat_interleave(width) / height
        cols = torch.arange(width, dtype=torch.float32).repeat(height) / width
        position = torch.stack([rows, cols], dim=1)
        edges, _ = remove_self_loops(grid(height, width)[0])
        if neighbours == 4:
            row, col = edges // width, edges % width
            steps = (row[0] - row[1]).abs() + (col[0] - col[1]).abs()
            edges = edges[:, steps == 1]
        init = farthest_points(position, num_clusters)
        return cls(height, width, position.to(device), edges.to(device), init.to(device))


def farthest_points(points: Tensor, count: int) -> Tensor:
    """Deterministic, well spread seeds: farthest-point sampling from token 0.

    (N, d) -> (count,) indices.
    """
    chosen = torch.zeros(count, dtype=torch.long)
    dist = torch.full((points.shape[0],), float("inf"))
    for i in range(1, count):
        dist = torch.minimum(dist, (points - points[chosen[i - 1]]).square().sum(-1))
        chosen[i] = dist.argmax()
    return chosen


def _flat_cluster_index(labels: Tensor, num_clusters: int) -> Tensor:
    offsets = torch.arange(labels.shape[0], device=labels.device)[:, None] * num_clusters
    return (labels + offsets).reshape(-1)


def kmeans(features: Tensor, init: Tensor, iters: int) -> Tensor:
    """Lloyd's k-means with a fixed iteration count. (G, L, d), seeds (C,) -> labels (G, L).

    A cluster that loses all its tokens keeps its previous centroid, so the result is
    deterministic and every shape is static.
    """
    groups, num_tokens, dim = features.shape
    num_clusters = init.shape[0]
    centroids = features[:, init]
    flat = features.reshape(-1, dim)
    ones = features.new_ones(groups * num_tokens, 1)
    for _ in range(iters):
        labels = torch.cdist(features, centroids).argmin(-1)
        index = _flat_cluster_index(labels, num_clusters)
        size = groups * num_clusters
        means, _ = avg_pool_x(index, flat, None, batch_size=1, size=size)
        counts, _ = max_pool_x(index, ones, None, batch_size=1, size=size)
        filled = counts.view(groups, num_clusters, 1) > 0
        centroids = torch.where(filled, means.view(groups, num_clusters, dim), centroids)
    return torch.cdist(features, centroids).argmin(-1)


def cluster_features(
    output: Tensor, position: Tensor, scale: float, combine: str = "concat"
) -> Tensor:
    """k-means features from scale·output and the position code (row/H', col/W').

    `combine` "concat": the position code next to the channels, (G, L, F) -> (G, L, F+2);
    content then shapes the clusters strongly. "add" (the reference's): row/H' added to the
    first half of the channels and col/W' to the second half, (G, L, F) -> (G, L, F); position
    then dominates (about sqrt(F/2) per axis) and clusters are compact spatial blobs.
    """
    pos = position.to(torch.float32).expand(output.shape[0], -1, -1)
    if combine == "concat":
        return torch.cat([scale * output.float(), pos], dim=-1)
    if combine != "add":
        raise ValueError(f"combine={combine!r}: must be 'concat' or 'add'")
    dim = output.shape[-1]
    half = dim // 2
    rows, cols = pos[..., :1].expand(-1, -1, half), pos[..., 1:].expand(-1, -1, dim - half)
    code = torch.cat([rows, cols], dim=-1)
    return scale * output.float() + code


def flat_cluster_index(labels: Tensor, num_clusters: int) -> Tensor:
    """The cluster of each token as a node of all groups' clusters: g·C + label. (G·L,)"""
    return _flat_cluster_index(labels, num_clusters)


def cluster_maxima(
    diff: Tensor, labels: Tensor, num_clusters: int, index: Tensor | None = None
) -> Tensor:
    """Channel-wise max of `diff` over each cluster's tokens (graph max-pooling of token
    features into cluster nodes). (G, L, F) -> (G, C, F); an empty cluster gives 0.
    `index`: `flat_cluster_index(labels)`, when the caller keeps it."""
    groups, _, dim = diff.shape
    if index is None:
        index = _flat_cluster_index(labels, num_clusters)
    pooled, _ = max_pool_x(
        index, diff.reshape(-1, dim).float(), None, batch_size=1, size=groups * num_clusters
    )
    return pooled.view(groups, num_clusters, dim)


def cluster_scores(
    diff: Tensor, labels: Tensor, num_clusters: int, index: Tensor | None = None
) -> Tensor:
    """Score per cluster: norm of the channel-wise max of `diff` over the cluster's tokens.

    (G, L, F) -> (G, C); an empty cluster scores 0. `index` as in `cluster_maxima`.
    """
    return cluster_maxima(diff, labels, num_clusters, index).norm(dim=-1)


def cluster_adjacency(
    labels: Tensor, edges: Tensor, num_clusters: int, self_loops: bool = False
) -> Tensor:
    """Which clusters touch on the token grid (the coarsened graph). -> (G, C, C) bool; with
    `self_loops` every cluster is also its own neighbour."""
    groups = labels.shape[0]
    src, dst = labels[:, edges[0]], labels[:, edges[1]]
    pair = src * num_clusters + dst
    flat = _flat_cluster_index(pair, num_clusters * num_clusters)
    size = groups * num_clusters * num_clusters
    ones = torch.ones(flat.shape[0], 1, device=labels.device)
    touch, _ = max_pool_x(flat, ones, None, batch_size=1, size=size)
    adjacency = touch.view(groups, num_clusters, num_clusters) > 0
    eye = torch.eye(num_clusters, dtype=torch.bool, device=labels.device)
    return adjacency | eye if self_loops else adjacency & ~eye


def smooth_scores(score: Tensor, adjacency: Tensor) -> Tensor:
    """Neighbour aggregation on the cluster graph: own score + mean + max of the neighbours'."""
    neighbours = adjacency.to(score.dtype)
    degree = neighbours.sum(-1)
    mean = (neighbours * score[:, None, :]).sum(-1) / degree.clamp(min=1)
    masked = torch.where(adjacency, score[:, None, :], torch.full_like(neighbours, -torch.inf))
    maximum = torch.where(degree > 0, masked.amax(-1), torch.zeros_like(score))
    return score + mean + maximum


def smooth_channel_maxima(maxima: Tensor, adjacency: Tensor) -> Tensor:
    """The reference's smoothing of the first selection's cluster scores, as it runs.

    Per channel, over the cluster graph `adjacency` (G, C, C) (self loops included by the
    caller): mean + sum + max of the pooled channel maxima `maxima` (G, C, F) of a cluster's
    neighbours; then the L2 norm over the channels. -> (G, C). The reference's code reads as
    2·mean + max (torch-geometric's `MultiAggregation(["mean", "mean", "max"], mode="sum")`),
    but on torch-geometric's fused path (>= 2.3) one of the two mean slots is left an
    unnormalised sum; we follow what runs (design notes §7). Dense (G, C, C) ops: static
    shapes, no host sync.
    """
    neighbours = adjacency.to(maxima.dtype)
    degree = neighbours.sum(-1, keepdim=True).clamp(min=1)
    total = torch.bmm(neighbours, maxima)
    masked = torch.where(adjacency[..., None], maxima[:, None, :, :], -torch.inf)
    maximum = masked.amax(2)
    maximum = torch.where(torch.isfinite(maximum), maximum, torch.zeros_like(maximum))
    return (total / degree + total + maximum).norm(dim=-1)
