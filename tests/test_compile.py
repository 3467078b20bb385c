"""torch.compile: the pruned path traces as one graph, and compiled runs equal eager ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generate, make_pipe
from torch._dynamo.utils import counters

from catpatch import CATConfig, apply_cat, cat_generation, remove_cat
from catpatch.caches import BlockCache, StepIndex
from catpatch.models.shapes import build_transformer
from catpatch.patching import get_patch
from catpatch.schedule import Mode
from catpatch.sd3 import cat_block_forward, gather_tokens

CFG = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("block_index", [0, 3])  # a dual-attention block and the last block
def test_pruned_block_compiles_as_one_graph(block_index):
    torch.manual_seed(0)
    block = build_transformer("tiny-sd3.5-medium").transformer_blocks[block_index]
    rows, tokens, text, dim = 2, 64, 7, 32
    h, ctx, temb = torch.randn(rows, tokens, dim), torch.randn(rows, text, dim), torch.randn(2, 32)
    index = torch.stack([torch.randperm(tokens)[:19].sort().values for _ in range(rows)])
    caches = [BlockCache(), BlockCache()]
    with torch.no_grad():
        for cache in caches:
            cat_block_forward(block, cache, h, ctx, temb)
        compiled = torch.compile(cat_block_forward, fullgraph=True, dynamic=False)
        h1 = torch.randn(rows, tokens, dim)
        args = (gather_tokens(h1, index), torch.randn(rows, text, dim), temb)
        step = StepIndex.of(index, tokens, text)
        eager = cat_block_forward(block, caches[0], *args, step, h1.clone())
        graph = compiled(block, caches[1], *args, step, h1.clone())
    torch.testing.assert_close(graph[1], eager[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].key, caches[0].key, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].ff, caches[0].ff, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("selection", ["cat", "paper", "noise", "stale"])
def test_per_step_selection_compiles_as_one_graph(selection):
    """Recency update, replacement of unselected outputs and the next selection: one graph,
    so no host sync and no data-dependent shape."""
    torch.manual_seed(0)
    model = build_transformer("tiny-sd3")
    apply_cat(model, CFG.replace(selection=selection, warmup_steps=2, lean=False))
    state = get_patch(model).state
    rows = 2
    inputs = dict(
        encoder_hidden_states=torch.randn(rows, 9, 64),
        pooled_projections=torch.randn(rows, 64),
        timestep=torch.full((rows,), 500.0),
    )
    with torch.no_grad(), cat_generation(model):
        for _ in range(3):
            model(hidden_states=torch.randn(rows, 16, 32, 32), **inputs)
        output = torch.randn(rows, 256, 64)
        held = [state.caches.previous, state.chosen, *state.tokens.tensors()]
        snapshot = [t.clone() for t in held]
        state.index.copy_(state.schedule.rows_of(state.chosen))
        eager = state.observe_output(Mode.PRUNED, output)
        eager_state = [t.clone() for t in held]
        for t, saved in zip(held, snapshot, strict=True):
            t.copy_(saved)
        # compiled as `compile=` compiles it: the bound method (a lambda closing over `state`
        # loses the in-place update of `state.chosen` on torch 2.13)
        step = torch.compile(state.observe_output, fullgraph=True)
        graph = step(Mode.PRUNED, output)
        graph_state = [t.clone() for t in held]
    torch.testing.assert_close(graph, eager)
    for a, b in zip(graph_state, eager_state, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("token_order", [0, 1])
def test_compile_option_matches_eager_without_per_step_recompiles(token_order):
    """Compiled CAT equals eager CAT, and compiles nothing new after its first pruned step:
    in the FIRST generation (cold: a graph guarded on the step counter would recompile every
    step, up to dynamo's limit) and in later ones. No exact graph count: only that it does not
    grow with the number of pruned steps."""
    pipe = make_pipe()
    config = CFG.replace(token_order=token_order)
    apply_cat(pipe, config)
    eager = generate(pipe)
    start = counters["stats"]["unique_graphs"]
    apply_cat(pipe, config.replace(compile="default"))
    assert get_patch(pipe).state.persistent
    per_step = []

    def count(p, i, t, kw):
        per_step.append(counters["stats"]["unique_graphs"])
        return kw

    first = generate(pipe, callback_on_step_end=count)
    t0 = CFG.warmup_steps
    assert per_step[t0] > start, "the first pruned step compiled nothing: not compiled?"
    assert per_step[-1] == per_step[t0], (
        f"graphs after each step of the first generation: {per_step[t0:]}; they grow with "
        f"the pruned steps (traced code guards on something that changes every step)"
    )
    graphs = counters["stats"]["unique_graphs"]
    second = generate(pipe)  # warm: every phase already has its graph
    third = generate(pipe)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled in a warm generation"
    assert graphs - start <= 12
    np.testing.assert_allclose(first, eager, atol=2e-4)
    np.testing.assert_allclose(second, eager, atol=2e-4)
    np.testing.assert_array_equal(second, third)
    remove_cat(pipe)
    assert "_compiled_call_impl" not in vars(pipe.transformer)
    assert get_patch(pipe) is None


def test_user_compiled_patched_transformer_matches_eager():
    """The user's own recipe: apply_cat, then compile the transformer in place."""
    pipe = make_pipe()
    apply_cat(pipe, CFG)
    eager = generate(pipe)
    pipe.transformer.compile()
    compiled = generate(pipe)
    np.testing.assert_allclose(compiled, eager, atol=2e-4)
