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


def check_selection(index: torch.Tensor, budget: int, tokens: int) -> None:
    """A token selection: per row, `budget` distinct token indices in range, sorted."""
    assert index.shape[1] == budget
    for row in index:
        assert len(set(row.tolist())) == budget, "duplicate tokens"
        assert int(row.min()) >= 0 and int(row.max()) < tokens
        assert torch.equal(row, row.sort().values)


def instance_state(pipe) -> dict:
    """What a pipeline and its transformer's modules hold on their instances (attribute names,
    hook counts, instance `forward`s): `remove_cat` must give it back as it was."""
    modules = dict(pipe.transformer.named_modules())
    return {
        "pipe": set(vars(pipe)),
        "modules": {k: set(vars(m)) for k, m in modules.items()},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks)) for k, m in modules.items()
        },
        "forward": {k: vars(m).get("forward") for k, m in modules.items()},
    }


def check_model_cpu_offload(order: str, make, generate, config) -> None:
    """diffusers' model offload hooks (accelerate) next to catpatch's, enabled before
    (`order="offload_first"`) or after `apply_cat(config)`; the execution device is the CPU
    here, so this checks that the hooks compose and results hold. `make()` builds the pipeline,
    `generate(pipe)` runs it the same way each time."""
    from catpatch import apply_cat, cat_stats, remove_cat

    reference = make()
    apply_cat(reference, config)
    expected = generate(reference)
    pipe = make()
    if order == "offload_first":
        pipe.enable_model_cpu_offload(device="cpu")
        apply_cat(pipe, config)
    else:
        apply_cat(pipe, config)
        pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(generate(pipe), expected, atol=1e-5)
    assert cat_stats(pipe).pruned_steps == 6
    remove_cat(pipe)
    np.testing.assert_allclose(generate(pipe), generate(make()), atol=1e-5)
