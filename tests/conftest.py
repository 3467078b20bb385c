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
