"""Selection and clustering on hand-made tensors: budgets, ranks, quotas, compactness (the
reference's "paper" selection: test_selection_paper.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import check_selection

from catpatch import CATConfig, policies
from catpatch.policies import cat, clustering, noise, random, ranking, stale
from catpatch.schedule import Geometry


def test_ranks_and_rank_within_clusters():
    key = torch.tensor([[5.0, 1.0, 3.0, 4.0, 2.0, 0.0]])
    assert ranking.ranks(key, descending=True).tolist() == [[0, 4, 2, 1, 3, 5]]
    labels = torch.tensor([[0, 1, 0, 1, 0, 1]])
    # cluster 0 holds tokens 0, 2, 4 (keys 5, 3, 2); cluster 1 holds 1, 3, 5 (keys 1, 4, 0)
    within = ranking.rank_within_clusters(key, labels, 2, descending=True)
    assert within.tolist() == [[0, 1, 1, 0, 2, 2]]
    assert ranking.cluster_sizes(labels, 3).tolist() == [[3, 3, 0]]


def test_recency_update():
    f = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    f = ranking.update_recency(f, torch.tensor([[1, 2]]), 0.5)
    assert f.tolist() == [[0.5, 1.0, 2.0, 0.0]]


def test_stale_selection_picks_stalest_round_robin():
    tokens, budget = 10, 4
    f = torch.zeros(1, tokens)
    seen = []
    for _ in range(3):
        index = stale.stale_selection(f, budget)
        check_selection(index, budget, tokens)
        seen.append(index[0].tolist())
        f = ranking.update_recency(f, index, 0.5)
    assert seen[0] == [0, 1, 2, 3] and seen[1] == [4, 5, 6, 7]
    assert seen[2] == [0, 1, 8, 9]  # the two never-computed, then the two oldest


def _two_cluster_case():
    # 2 groups x 12 tokens; clusters: tokens 0-5 -> 0, 6-11 -> 1
    labels = torch.tensor([[0] * 6 + [1] * 6] * 2)
    delta = torch.arange(12.0).repeat(2, 1)
    delta[1] = delta[1].flip(0)
    return labels, delta


def test_first_selection_walks_best_cluster_first():
    labels, delta = _two_cluster_case()
    scores = torch.tensor([[1.0, 5.0], [5.0, 1.0]])
    index = cat.first_selection(delta, scores, labels, budget=5, quota=3)
    check_selection(index, 5, 12)
    # group 0: cluster 1 first (top-3 drift 11, 10, 9), then cluster 0's top-2 (5, 4)
    assert index[0].tolist() == [4, 5, 9, 10, 11]
    # group 1 (drift reversed): cluster 0 first: tokens 0, 1, 2 then cluster 1's 6, 7
    assert index[1].tolist() == [0, 1, 2, 6, 7]


def test_first_selection_pads_when_clusters_run_out():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 2]])
    delta = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]])
    index = cat.first_selection(delta, torch.tensor([[3.0, 2, 1]]), labels, 7, quota=2)
    check_selection(index, 7, 8)
    assert index[0].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_cat_selection_budget_split():
    torch.manual_seed(0)
    groups, tokens, clusters, budget = 3, 200, 5, 60
    labels = torch.randint(0, clusters, (groups, tokens))
    delta = torch.rand(groups, tokens)
    recency = torch.rand(groups, tokens)
    scores = torch.rand(groups, clusters)
    cluster_budget = 15
    quotas, recency_quota = cat.cluster_quotas(clusters, budget, 0.05)
    assert quotas == [9, 6, 3, 3, 3] and recency_quota == 1
    index = cat.cat_selection(
        delta, scores, labels, recency, budget, cluster_budget, torch.tensor(quotas), recency_quota
    )
    check_selection(index, budget, tokens)
    k = 3  # round(0.05 * 60)
    for g in range(groups):
        chosen = set(index[g].tolist())
        best = int(scores[g].argmax())
        members = (labels[g] == best).nonzero().flatten()
        top = members[delta[g, members].argsort(descending=True)[: 3 * k]]
        assert set(top.tolist()) <= chosen, "best cluster's top-drift quota missing"
        stalest = recency[g].argsort()[: budget - cluster_budget]
        assert set(stalest.tolist()) <= chosen, "stalest tokens missing"


def test_cat_selection_without_cluster_quota_is_staleness():
    recency = torch.tensor([[3.0, 0.0, 2.0, 1.0, 0.5, 4.0]])
    delta = torch.zeros(1, 6)
    index = cat.cat_selection(
        delta, torch.ones(1, 2), torch.tensor([[0, 0, 0, 1, 1, 1]]), recency, 3, 0,
        torch.tensor([3, 2]), 1,
    )  # fmt: skip
    assert index[0].tolist() == [1, 3, 4]


def test_noise_and_random_selection():
    delta = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2]])
    assert noise.noise_selection(delta, 2)[0].tolist() == [1, 3]
    gen = torch.Generator().manual_seed(3)
    a = random.random_selection(2, 50, 10, gen, torch.device("cpu"))
    check_selection(a, 10, 50)
    b = random.random_selection(2, 50, 10, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("height,width", [(16, 16), (12, 20)])
def test_kmeans_clusters_are_compact_and_deterministic(height, width):
    grid = clustering.GridGeometry.build(height, width, 8, "cpu")
    output = torch.randn(2, height * width, 64)
    features = clustering.cluster_features(output, grid.position, 0.05)
    labels = clustering.kmeans(features, grid.init, 10)
    again = clustering.kmeans(features, grid.init, 10)
    assert torch.equal(labels, again)
    assert labels.shape == (2, height * width)
    pos = grid.position
    for g in range(2):
        sizes = ranking.cluster_sizes(labels[g : g + 1], 8)[0]
        assert int((sizes > 0).sum()) == 8, "a cluster is empty"
        # compact: spatial spread within clusters much smaller than over the image
        spread = sum(pos[labels[g] == c].var(0).sum() * sizes[c] for c in range(8)) / sizes.sum()
        assert spread < 0.25 * pos.var(0).sum()


def test_cluster_scores_adjacency_and_smoothing():
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 2]])  # 1x4 grids
    grid = clustering.GridGeometry.build(1, 4, 2, "cpu")
    diff = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [0.0, 4.0], [-1.0, -1.0]]] * 2)
    scores = clustering.cluster_scores(diff, labels, 3)
    assert torch.allclose(scores[0], torch.tensor([(9 + 0) ** 0.5, (0 + 16) ** 0.5, 0.0]))
    adjacency = clustering.cluster_adjacency(labels, grid.edges, 3)
    assert adjacency[0].tolist() == [[False, True, False], [True, False, False], [False] * 3]
    assert adjacency[1].tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    s = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    smoothed = clustering.smooth_scores(s, adjacency)
    assert smoothed[0].tolist() == [1 + 2 + 2, 2 + 1 + 1, 4.0]
    assert smoothed[1].tolist() == [1 + 2 + 2, 2 + 2.5 + 4, 4 + 2 + 2]


# ---- what CAT picks, by the specification, on hand-made fields --------------------------------
def _spots(height: int = 16, width: int = 16, features: int = 4):
    """Drift confined to two 3 x 3 spots: a hot one in the top-left corner, a weaker one in the
    bottom-right; every token's drift is distinct (hot spot 10..18, weak spot 2..2.8, a faint
    gradient elsewhere) so each rank is unambiguous."""
    tokens = height * width
    magnitude = 1e-3 * torch.arange(tokens, 0, -1, dtype=torch.float32)
    hot = [r * width + c for r in range(3) for c in range(3)]
    weak = [(height - 1 - r) * width + (width - 1 - c) for r in range(3) for c in range(3)]
    magnitude[hot] = 10.0 + torch.arange(9.0)
    magnitude[weak] = 2.0 + 0.1 * torch.arange(9.0)
    direction = torch.zeros(features)
    direction[0] = 1.0
    return magnitude[None, :, None] * direction, hot, weak


def test_cat_policy_picks_what_the_spec_says():
    """Through the registry, as a run uses it: after the first selection, a pruned step's
    selection holds the 3k top-drift tokens of the best cluster and the 2k of the second
    (spec §3 step 3, even though they were just computed), and the stalest tokens elsewhere
    (step 4) — so it is not the staleness-only selection, which never revisits them."""
    config = CATConfig(selection="cat", keep_ratio=0.25, num_clusters=4, cluster_feature_scale=0.0)
    geometry = Geometry(1, 16, 16, 9, torch.device("cpu"), torch.float32)
    budget = config.budget(geometry.tokens)
    cluster_budget = int(config.cluster_fraction * budget)
    quotas, _ = cat.cluster_quotas(config.num_clusters, budget, config.cluster_quota)
    assert (budget, cluster_budget, quotas[:2]) == (64, 16, [9, 6])
    policy, _ = policies.build(config)
    policy.prepare(geometry, budget)
    drift, hot, weak = _spots()
    policy.observe_reference(torch.zeros_like(drift))
    first = policy.first(drift)
    check_selection(first, budget, geometry.tokens)
    assert set(hot) <= set(first[0].tolist()), "first selection: the hot spot is missing"

    chosen = policy.next(drift, first)
    check_selection(chosen, budget, geometry.tokens)
    picked = set(chosen[0].tolist())
    assert set(hot) <= picked, "the best cluster's 3k top-drift tokens are missing"
    assert set(weak[-6:]) <= picked, "the second cluster's 2k top-drift tokens are missing"
    # f after this step: 1 for the first selection's tokens, 0 for all others
    recency = torch.zeros(1, geometry.tokens).scatter_(1, first, 1.0)
    revisited = {t for t in picked if recency[0, t] > 0}
    assert revisited == set(hot) | set(weak[-6:]), "cluster quota: only the drift picks"
    assert len(revisited) <= cluster_budget
    # the rest are the stalest tokens (f = 0); catpatch breaks their ties by larger drift
    stalest = [t for t in drift[0, :, 0].argsort(descending=True).tolist() if recency[0, t] == 0]
    assert set(stalest[: budget - cluster_budget - 1]) <= picked, "stalest tokens missing"
    staleness_only = set(stale.stale_selection(recency, budget)[0].tolist())
    assert not staleness_only & (set(hot) | set(weak)), "staleness-only revisits no spot"
    assert picked != staleness_only
