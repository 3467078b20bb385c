"""The anchors of a budgeted run's forecast steps (`CATConfig(macs=B, anchors=k)`): k tokens
of every CAT cluster, chosen by drift × staleness ("score") or at random ("random").

At each computed step (the recording step of the pruned-step machinery) the token grid is
clustered anew (CAT's position-coded k-means) and that output becomes the drift reference; on
each forecast step the next anchors are the k tokens of each cluster whose forecast moved most
from the reference, discounted by how recently they were anchors (1 / (1 + recency)). The
corrector (`catpatch.correction`) moves each cluster by its anchors' forecast error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import clustering, ranking
from .cat import CatPolicy


class AnchorPolicy(CatPolicy):
    name = "anchors"

    def prepare(self, geometry, budget: int) -> None:
        super().prepare(geometry, budget)
        if self.recency is not None:  # persistent buffers: a new run starts unanchored
            self.recency.zero_()
        self.reference_set = False
        if self.config.anchor_choice == "random":
            self.generator = torch.Generator(device=geometry.device).manual_seed(self.config.seed)

    def first(self, output: Tensor) -> Tensor:
        """At a computed step: cluster, take its output as the drift reference, pick."""
        cfg, grid = self.config, self.grid
        if self.recency is None or self.recency.shape != output.shape[:2]:
            self.reset_recency(output)
        features = clustering.cluster_features(output, grid.position, cfg.cluster_feature_scale)
        labels = clustering.kmeans(features, grid.init, cfg.kmeans_iters)
        self.labels = self.keep(self.labels, labels)
        # picked against the previous computed step (how far each token moved over the
        # gap), before this output becomes the reference of the next forecast steps
        chosen = self.pick(output)
        self.observe_reference(output)
        self.reference_set = True
        return chosen

    def next(self, output: Tensor, computed: Tensor) -> Tensor:
        self.update_recency(computed)
        return self.pick(output)

    def pick(self, output: Tensor) -> Tensor:
        """k tokens of every cluster (G, S): the best scores in each, clusters in turn."""
        if self.config.anchor_choice == "random":
            score = torch.rand(output.shape[:2], device=output.device, generator=self.generator)
        elif not self.reference_set:  # the run's first pick: no drift yet, the stalest
            score = 1 / (1 + self.recency)
        else:
            _, delta = self.drift(output)
            # the staleness also breaks ties where nothing moved (a reused forecast)
            score = (delta + 1e-6 * delta.mean(1, keepdim=True)) / (1 + self.recency)
        within = ranking.rank_within_clusters(score, self.labels, self.config.num_clusters, True)
        overall = ranking.ranks(score, descending=True)
        return ranking.take_smallest(within * output.shape[1] + overall, self.budget)
