"""FLUX under torch.compile and the host-sync guard: the pruned step reads no tensor value on
the host, and `compile=` compiles nothing new per pruned step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_support import CFG, TRUE_CFG, flux_pipe, run
from test_guards import NoHostSync
from torch._dynamo.utils import counters

from catpatch import apply_cat, cat_generation, cat_stats, remove_cat
from catpatch.models.shapes import build_transformer
from catpatch.patching import get_patch


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "dense"])
def test_pruned_step_has_no_host_sync(lean):
    """Whole pruned calls (hooks, rotary rows, pruned double and single blocks, output
    replacement, recency update and next selection), both calls of a true-CFG step."""
    torch.manual_seed(0)
    model = build_transformer("tiny-flux")
    apply_cat(model, CFG.replace(warmup_steps=2, lean=lean))
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(8, 8, 3)
    ids[..., 1] += torch.arange(8)[:, None]
    ids[..., 2] += torch.arange(8)[None, :]
    fixed = dict(img_ids=ids.view(-1, 3), txt_ids=torch.zeros(6, 3))
    prompts = [
        dict(encoder_hidden_states=torch.randn(2, 6, 32, generator=gen),
             pooled_projections=torch.randn(2, 32, generator=gen))
        for _ in range(2)
    ]  # fmt: skip
    with torch.no_grad(), cat_generation(model, num_inference_steps=5, calls_per_step=2):
        for step in range(5):
            x = torch.randn(2, 64, 16, generator=gen)
            t = torch.full((2,), 1 - step / 5)
            for prompt in prompts:
                if step < 2:
                    model(hidden_states=x, timestep=t, **prompt, **fixed)  # set-up may sync
                    continue
                with NoHostSync():
                    model(hidden_states=x, timestep=t, **prompt, **fixed)
    assert cat_stats(model).pruned_steps == 3


@pytest.mark.parametrize("true_cfg", [False, True], ids=["one-call", "true-cfg"])
def test_compile_option_matches_eager_without_per_step_recompiles(fresh_dynamo, true_cfg):
    pipe = flux_pipe()
    kwargs = TRUE_CFG if true_cfg else {}
    apply_cat(pipe, CFG)
    eager = run(pipe, **kwargs)
    start = counters["stats"]["unique_graphs"]
    apply_cat(pipe, CFG.replace(compile="default"))
    assert get_patch(pipe).state.persistent
    per_step = []

    def count(p, i, t, kw):
        per_step.append(counters["stats"]["unique_graphs"])
        return kw

    first = run(pipe, callback_on_step_end=count, **kwargs)
    t0 = CFG.warmup_steps
    assert per_step[t0] > start, "the first pruned step compiled nothing: not compiled?"
    assert per_step[-1] == per_step[t0], f"graphs grow with the pruned steps: {per_step[t0:]}"
    graphs = counters["stats"]["unique_graphs"]
    second = run(pipe, **kwargs)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled in a warm generation"
    np.testing.assert_allclose(first, eager, atol=2e-4)
    np.testing.assert_allclose(second, eager, atol=2e-4)
    remove_cat(pipe)
    assert get_patch(pipe) is None


def test_user_compiled_patched_transformer_matches_eager(fresh_dynamo):
    pipe = flux_pipe()
    apply_cat(pipe, CFG)
    eager = run(pipe)
    pipe.transformer.compile()
    np.testing.assert_allclose(run(pipe), eager, atol=2e-4)
    assert cat_stats(pipe).pruned_steps == 6
