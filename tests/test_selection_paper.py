"""The reference's own selection ("paper", design notes §7): position added into the cluster
features, the 4-neighbour cluster graph and its mean + sum + max smoothing (against
torch-geometric), its quota floors, its union of drift and least-recent picks, no host sync, and
the `CATConfig.paper()` preset in a pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import check_selection, generate, make_pipe, policy_after_first
from torch.utils._python_dispatch import TorchDispatchMode

from catpatch import CATConfig, apply_cat, cat_stats, policies, remove_cat
from catpatch.patching import get_patch
from catpatch.policies import cat, clustering, paper, ranking
from catpatch.schedule import Geometry, Mode


# ---- the reference's own selection ("paper", design notes §7) --------------------------------
def test_paper_features_add_the_position_into_the_channels():
    grid = clustering.GridGeometry.build(2, 3, 2, "cpu")
    output = torch.randn(1, 6, 5)
    features = clustering.cluster_features(output, grid.position, 0.05, combine="add")
    assert features.shape == (1, 6, 5)  # no extra channels
    row, col = grid.position[:, :1], grid.position[:, 1:]
    torch.testing.assert_close(features[0, :, :2], 0.05 * output[0, :, :2] + row)
    torch.testing.assert_close(features[0, :, 2:], 0.05 * output[0, :, 2:] + col)
    with pytest.raises(ValueError, match="combine"):
        clustering.cluster_features(output, grid.position, 0.05, combine="sum")


def _smooth_field(height: int, width: int, features: int = 64, amplitude: float = 4.0):
    """A smooth model output: every channel a low-frequency plane wave of the grid."""
    gen = torch.Generator().manual_seed(0)
    position = clustering.GridGeometry.build(height, width, 1, "cpu").position
    frequency = 2 * torch.rand(features, 2, generator=gen)
    phase = 6.28 * torch.rand(features, generator=gen)
    wave = 2 * torch.pi * position @ frequency.T + phase
    return amplitude * torch.sin(wave)[None]


def test_paper_features_give_compact_spatial_clusters():
    """On a smooth field, position added into the channels dominates: the clusters are compact
    spatial blobs (spread within clusters near that of pure spatial tiles), more compact and
    more even in size than "cat"'s, where content shapes the clusters."""
    height = width = 24
    clusters = 20
    grid = clustering.GridGeometry.build(height, width, clusters, "cpu")
    field = _smooth_field(height, width)
    pos = grid.position

    def spread_and_smallest(combine: str, scale: float = 0.05) -> tuple[float, int]:
        features = clustering.cluster_features(field, pos, scale, combine=combine)
        labels = clustering.kmeans(features, grid.init, 10)[0]
        sizes = ranking.cluster_sizes(labels[None], clusters)[0]
        spread = sum(pos[labels == c].var(0, unbiased=False).sum() * sizes[c]
                     for c in range(clusters) if sizes[c] > 0)  # fmt: skip
        return float(spread) / labels.numel(), int(sizes.min())

    paper, cat_, tiles = (
        spread_and_smallest("add"), spread_and_smallest("concat"), spread_and_smallest("concat", 0)
    )  # fmt: skip
    assert paper[0] < 0.8 * cat_[0], (paper, cat_)
    assert paper[0] < 1.25 * tiles[0], (paper, tiles)
    assert paper[1] > cat_[1], "paper's smallest cluster should be larger than cat's"


def test_paper_grid_has_four_neighbours():
    eight = clustering.GridGeometry.build(3, 3, 2, "cpu").edges
    four = clustering.GridGeometry.build(3, 3, 2, "cpu", neighbours=4).edges
    assert four.shape[1] == 2 * 12 and eight.shape[1] == 2 * 20  # 12 edges vs 12 + 8 diagonal
    pairs = {tuple(e) for e in four.T.tolist()}
    assert (0, 1) in pairs and (0, 3) in pairs and (0, 4) not in pairs


def test_paper_smoothing_on_a_hand_made_cluster_graph():
    """Per channel, over the 4-neighbour cluster graph with self loops: mean + sum + max of the
    pooled channel maxima, then the L2 norm. 2 x 2 grid, clusters 0 | 1 / 1 | 2: clusters 0 and
    2 touch only diagonally, so they are no neighbours."""
    labels = torch.tensor([[0, 1, 1, 2]])
    grid = clustering.GridGeometry.build(2, 2, 3, "cpu", neighbours=4)
    adjacency = clustering.cluster_adjacency(labels, grid.edges, 3, self_loops=True)
    assert adjacency[0].int().tolist() == [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    diff = torch.tensor([[[1.0, -5.0], [0.0, 2.0], [-1.0, 0.0], [3.0, -1.0]]])
    maxima = clustering.cluster_maxima(diff, labels, 3)
    assert maxima[0].tolist() == [[1.0, -5.0], [0.0, 2.0], [3.0, -1.0]]
    smoothed = clustering.smooth_channel_maxima(maxima, adjacency)
    # cluster 0: {0, 1}: mean (0.5, -1.5) + sum (1, -3) + max (1, 2) -> (2.5, -2.5)
    # cluster 1: {0, 1, 2}: mean (4/3, -4/3) + sum (4, -4) + max (3, 2) -> (25/3, -10/3)
    # cluster 2: {1, 2}: mean (1.5, 0.5) + sum (3, 1) + max (3, 2) -> (7.5, 3.5)
    expected = torch.tensor([[12.5**0.5, 725**0.5 / 3, 68.5**0.5]])
    torch.testing.assert_close(smoothed, expected)


def test_paper_smoothing_is_mean_plus_sum_plus_max_on_a_path_graph():
    """§7's check: the 3-cluster path graph 0 - 1 - 2 (a 1 x 3 grid, one token per cluster)
    with values 1, 10, 100, self included, gives 26.5, 248, 265 (2·mean + max would give
    21, 174, 210)."""
    labels = torch.tensor([[0, 1, 2]])
    grid = clustering.GridGeometry.build(1, 3, 3, "cpu", neighbours=4)
    adjacency = clustering.cluster_adjacency(labels, grid.edges, 3, self_loops=True)
    maxima = clustering.cluster_maxima(torch.tensor([[[1.0], [10.0], [100.0]]]), labels, 3)
    smoothed = clustering.smooth_channel_maxima(maxima, adjacency)
    assert smoothed.tolist() == [[26.5, 248.0, 265.0]]


def test_paper_smoothing_matches_torch_geometric_as_it_runs():
    """The reference's aggregation, torch-geometric's `MultiAggregation(["mean", "mean", "max"],
    mode="sum")` over the cluster graph's edges, as it runs on the installed torch-geometric
    (mean + sum + max on its fused path), equals `smooth_channel_maxima` before the norm, on
    random clusters of a 6 x 6 grid (two groups, signed channels)."""
    from torch_geometric.nn.aggr import MultiAggregation

    gen = torch.Generator().manual_seed(0)
    clusters, features = 6, 5
    grid = clustering.GridGeometry.build(6, 6, clusters, "cpu", neighbours=4)
    labels = torch.randint(0, clusters, (2, 36), generator=gen)
    diff = torch.randn(2, 36, features, generator=gen)
    maxima = clustering.cluster_maxima(diff, labels, clusters)
    adjacency = clustering.cluster_adjacency(labels, grid.edges, clusters, self_loops=True)
    smoothed = clustering.smooth_channel_maxima(maxima, adjacency)
    aggregate = MultiAggregation(["mean", "mean", "max"], mode="sum")
    for g in range(2):
        dst, src = adjacency[g].nonzero().T  # row = the cluster, column = its neighbour
        reference = aggregate(maxima[g][src], dst, dim_size=clusters).norm(dim=-1)
        torch.testing.assert_close(smoothed[g], reference)


def test_paper_quota_floors():
    """At S = 77: k = ⌊⌊77/5⌋·0.25⌋ = 3 (catpatch's round(0.05·77) = 4) and the first
    selection takes ⌊77/10⌋ = 7 per cluster (catpatch's ⌈7.7⌉ = 8); least-recent quotas
    ⌊k_i/2⌋: 0 for the first cluster, k for the second, ⌊k/2⌋ after."""
    assert paper.paper_quotas(5, 77, 0.05) == ([9, 6, 3, 3, 3], [0, 3, 1, 1, 1])
    assert cat.cluster_quotas(5, 77, 0.05) == ([12, 8, 4, 4, 4], 2)
    assert paper.paper_first_quota(77, 0.1) == 7 and cat.first_quota_size(77, 0.1) == 8
    assert paper.paper_quotas(20, 1228, 0.05)[1][:3] == [0, 61, 30]  # §7's figures at S = 1228
    config = CATConfig.paper(keep_ratio=77 / 256, num_clusters=5)
    geometry = Geometry(1, 16, 16, 9, torch.device("cpu"), torch.float32)
    budget = config.budget(geometry.tokens)
    assert budget == 77
    policy, _ = policies.build(config)
    assert isinstance(policy, paper.PaperPolicy)
    policy.prepare(geometry, budget)
    assert policy.quotas.tolist() == [9, 6, 3, 3, 3]
    assert policy.recent_quotas.tolist() == [0, 3, 1, 1, 1]


def _union_case():
    """40 tokens, clusters 0 (tokens 0-19, the best) and 1 (20-39). Cluster 0's top drift:
    tokens 0-5; cluster 1's: 36-39; cluster 1's least recent: 20, 21 (f 0.5, its others 1);
    cluster 0's other tokens have f = 0, so the staleness share never reaches cluster 1."""
    delta = 0.01 * torch.arange(40.0)
    delta[:6] = 10.0 + torch.arange(6.0)
    delta[36:] = 5.0 + torch.arange(4.0)
    recency = torch.ones(40)
    recency[6:20] = 0.0
    recency[20:22] = 0.5
    labels = torch.tensor([0] * 20 + [1] * 20)
    return delta[None], torch.tensor([[2.0, 1.0]]), labels[None], recency[None]


def test_paper_selection_unites_drift_and_least_recent_picks():
    """Quotas k = 2: the best cluster gives its 3k = 6 top-drift tokens, the second the union of
    its 2k = 4 top-drift tokens {36..39} and its ⌊2k/2⌋ = 2 least-recent {20, 21}, in index
    order: 20, 21, 36, 37, ... Cut at 9 cluster picks: 20, 21, 36 survive. "cat" walks drift
    picks first (largest drift first), so its cut keeps 39, 38, 37 and no least-recent pick."""
    delta, score, labels, recency = _union_case()
    budget, cluster_budget = 15, 9
    index = paper.paper_selection(
        delta, score, labels, recency, budget, cluster_budget,
        torch.tensor([6, 4]), torch.tensor([0, 2]),
    )  # fmt: skip
    check_selection(index, budget, 40)
    chosen = set(index[0].tolist())
    assert set(range(6)) <= chosen
    assert chosen & set(range(20, 40)) == {20, 21, 36}
    # the other 6: the stalest (f = 0) tokens of cluster 0, larger drift first
    assert chosen - set(range(6)) - {20, 21, 36} == set(range(14, 20))
    reference = cat.cat_selection(
        delta, score, labels, recency, budget, cluster_budget, torch.tensor([6, 4]), 2
    )
    assert set(reference[0].tolist()) & set(range(20, 40)) == {37, 38, 39}


def test_paper_selection_budget_and_shape():
    torch.manual_seed(0)
    groups, tokens, clusters, budget = 3, 200, 5, 60
    labels = torch.randint(0, clusters, (groups, tokens))
    quotas, recent = paper.paper_quotas(clusters, budget, 0.05)
    for recency in (torch.rand(groups, tokens), torch.zeros(groups, tokens)):  # ties: all f = 0
        index = paper.paper_selection(
            torch.rand(groups, tokens), torch.rand(groups, clusters), labels, recency, budget,
            int(0.25 * budget), torch.tensor(quotas), torch.tensor(recent),
        )  # fmt: skip
        check_selection(index, budget, tokens)


class _Dispatched(TorchDispatchMode):
    """Records every aten op dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


def _paper_policy_after_first():
    policy, output, first, budget = policy_after_first(
        CATConfig.paper(warmup_steps=2, num_clusters=5)
    )
    check_selection(first, budget, policy.geometry.tokens)
    return policy, output, first, budget


def test_paper_policy_has_no_host_sync_and_traces_as_one_graph():
    """`PaperPolicy.next` dispatches no `aten._local_scalar_dense` (no host read: no `.item()`,
    `.tolist()`, truth test), and traces with `torch.compile(fullgraph=True)` to the same
    selection and recency state as eager."""
    policy, output, chosen, budget = _paper_policy_after_first()
    gen = torch.Generator().manual_seed(1)
    output = output + 0.1 * torch.randn(output.shape, generator=gen)
    recency = policy.recency.clone()
    with _Dispatched() as mode:
        eager = policy.next(output, chosen)
    assert torch.ops.aten._local_scalar_dense.default not in mode.ops
    check_selection(eager, budget, output.shape[1])
    eager_recency = policy.recency.clone()
    policy.recency.copy_(recency)
    torch._dynamo.reset()
    try:
        graph = torch.compile(policy.next, fullgraph=True, backend="eager")(output, chosen)
    finally:
        torch._dynamo.reset()
    assert torch.equal(graph, eager)
    assert torch.equal(policy.recency, eager_recency)


def test_paper_preset_drift_reads_the_dense_estimate():
    """`CATConfig.paper()` keeps the dense residual stream (`lean=False`): after every pruned
    step, the selection's Δ input is the pruned step's fresh dense output for all L tokens
    (the driver rows), not the unselected tokens' last output that the step gives back. With
    `lean=True` the step's output holds only the S computed tokens and the Δ input of the
    unselected ones is what the step gives back."""
    assert CATConfig.paper().lean is False and CATConfig(selection="cat").lean is True

    def record(config):
        pipe = make_pipe()
        apply_cat(pipe, config)
        patch = get_patch(pipe)
        adapter, state = patch.adapter, patch.state
        observe, select = adapter._observe, state.tokens.next
        seen = []

        def spy_observe(mode, output, time=None):
            result = observe(mode, output, time)
            if mode is Mode.PRUNED:
                seen[-1].update(dense=output.clone(), result=result.clone())
            return result

        def spy_next(output, computed):
            seen.append({"estimate": output.clone(), "computed": computed.clone()})
            return select(output, computed)

        adapter._observe, state.tokens.next = spy_observe, spy_next
        generate(pipe, guidance_scale=1.0)  # no CFG: the driver rows are all rows
        remove_cat(pipe)
        return seen

    exact = record(CATConfig.paper(warmup_steps=4, num_clusters=8))
    tokens = exact[0]["estimate"].shape[1]  # L, all image tokens
    assert len(exact) == 6 and exact[0]["computed"].shape[1] == int(0.3 * tokens)
    for step in exact:
        assert step["dense"].shape[1] == tokens
        assert torch.equal(step["estimate"], step["dense"])
        unselected = torch.ones(tokens, dtype=torch.bool)
        unselected[step["computed"][0]] = False
        fresh, given = step["estimate"][:, unselected], step["result"][:, unselected]
        assert (fresh - given).abs().max() > 1e-4, "Δ read the unselected tokens' last output"
    lean = record(CATConfig.paper(warmup_steps=4, num_clusters=8, lean=True))
    for step in lean:
        assert step["dense"].shape[1] < tokens
        assert torch.equal(step["estimate"], step["result"])


def test_paper_preset_runs_in_a_pipeline():
    """`CATConfig.paper()` on a tiny pipeline: prunes, changes the image vs unpatched, and
    selects differently from "cat"."""
    pipe = make_pipe()
    base = generate(pipe)
    apply_cat(pipe, CATConfig.paper(warmup_steps=4, num_clusters=8))
    images = generate(pipe)
    stats = cat_stats(pipe)
    apply_cat(pipe, CATConfig(selection="cat", warmup_steps=4, num_clusters=8))
    cat_images = generate(pipe)
    remove_cat(pipe)
    assert stats.pruned_steps == 6 and stats.macs_ratio < 1
    assert np.isfinite(images).all()
    assert np.abs(images - base).max() > 1e-3, "paper changed nothing"
    assert np.abs(images - cat_images).max() > 1e-4, "paper selected as cat does"
