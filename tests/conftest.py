"""Shared helpers: tiny SD3-family pipelines built offline from configs (no download)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one thread is as fast, and does not oversubscribe a busy 2-core machine.
torch.set_num_threads(1)

SHAPES = ("tiny-sd3", "tiny-sd3.5-medium", "tiny-sd3.5-large")


def make_pipe(shape: str = "tiny-sd3", pipeline_cls=None, seed: int = 0):
    from catpatch.models.tiny import build_pipeline

    pipe = build_pipeline(shape, pipeline_cls=pipeline_cls, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    """Images as float arrays; small defaults so a call takes well under a second."""
    args = dict(prompt="a red circle", height=128, width=128, num_inference_steps=10)
    args.update(kwargs)
    args.setdefault("output_type", "np")
    return pipe(**args, generator=torch.Generator().manual_seed(seed)).images


@pytest.fixture
def pipe():
    return make_pipe()


def policy_after_first(config, groups: int = 2, height: int = 8, width: int = 12):
    """The token policy of `config` after its first selection on a hand-made drift field
    (seeded): (policy, output, first selection, budget S)."""
    from catpatch import policies
    from catpatch.schedule import Geometry

    policy, _ = policies.build(config)
    geometry = Geometry(groups, height, width, 9, torch.device("cpu"), torch.float32)
    budget = config.budget(geometry.tokens)
    policy.prepare(geometry, budget)
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(groups, geometry.tokens, 16, generator=gen)
    policy.observe_reference(reference)
    output = reference + torch.randn(reference.shape, generator=gen)
    return policy, output, policy.first(output), budget
