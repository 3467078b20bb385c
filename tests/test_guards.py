"""Guards on how tokens are chosen: no host sync in a pruned step or in the selection, the
conditional CFG row drives a shared selection, clusters live on the true token grid.

Each test here was checked to fail on a deliberate bug of its kind (see README "Development").
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from conftest import generate, policy_after_first
from torch.utils._python_dispatch import TorchDispatchMode

import catpatch
from catpatch import CATConfig, apply_cat, cat_generation, cat_stats
from catpatch.models.shapes import build_transformer
from catpatch.patching import get_patch
from catpatch.policies import cat

PACKAGE = str(Path(catpatch.__file__).parent)


class NoHostSync(TorchDispatchMode):
    """Raise on any read of a tensor value by the host: `.item()`, `.tolist()`, `int(t)`,
    `if t:` all dispatch `aten._local_scalar_dense` (a device sync on a GPU, and a graph break
    or a recompile source under torch.compile)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            where = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
            at = f" at {where[-1].filename}:{where[-1].lineno}" if where else ""
            raise AssertionError(f"host sync: {func} read a tensor value on the host{at}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_mode_catches_item():
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        torch.ones(2).sum().item()
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        bool(torch.ones(1) > 0)


def _inputs(rows: int, text: int = 9, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        encoder_hidden_states=torch.randn(rows, text, 64, generator=gen),
        pooled_projections=torch.randn(rows, 64, generator=gen),
    )


@pytest.mark.parametrize(
    "shape, token_order", [("tiny-sd3", 0), ("tiny-sd3.5-medium", 0), ("tiny-sd3", 1)]
)
def test_pruned_step_has_no_host_sync(shape, token_order):
    """A whole pruned transformer call (hooks, pruned blocks, output replacement or its
    forecast, recency update and the next selection) reads no tensor value on the host."""
    torch.manual_seed(0)
    model = build_transformer(shape)
    config = CATConfig(keep_ratio=0.3, warmup_steps=2, num_clusters=4, token_order=token_order)
    apply_cat(model, config)
    rows, steps = 2, 5
    inputs = _inputs(rows)
    with torch.no_grad(), cat_generation(model, num_inference_steps=steps):
        for step in range(steps):
            args = dict(
                hidden_states=torch.randn(rows, 16, 16, 16),
                timestep=torch.full((rows,), 1000.0 - 100 * step),
                **inputs,
            )
            if step < 2:
                model(**args)  # warm-up: clustering and set-up may sync
                continue
            with NoHostSync():
                model(**args)
    assert cat_stats(model).pruned_steps == 3


def _policy_after_first(selection: str):
    config = CATConfig(keep_ratio=0.3, warmup_steps=2, num_clusters=5, selection=selection)
    return policy_after_first(config)


@pytest.mark.parametrize("selection", ["cat", "paper", "noise", "stale", "random"])
def test_selection_has_no_host_sync(selection):
    """The per-step selection alone (what runs after every pruned step) on hand-made tensors:
    no host sync, static shape (G, S)."""
    token_policy, output, chosen, budget = _policy_after_first(selection)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        output = output + 0.1 * torch.randn(output.shape, generator=gen)
        with NoHostSync():
            chosen = token_policy.next(output, chosen)
        assert chosen.shape == (2, budget)


def test_cat_selection_function_has_no_host_sync():
    torch.manual_seed(0)
    groups, tokens, clusters, budget = 2, 96, 5, 28
    labels = torch.randint(0, clusters, (groups, tokens))
    quotas, recency_quota = cat.cluster_quotas(clusters, budget, 0.05)
    args = (
        torch.rand(groups, tokens), torch.rand(groups, clusters), labels,
        torch.rand(groups, tokens), budget, 7, torch.tensor(quotas), recency_quota,
    )  # fmt: skip
    with NoHostSync():
        index = cat.cat_selection(*args)
    assert index.shape == (groups, budget)


def test_conditional_row_drives_the_shared_selection(pipe):
    """Under CFG with a shared selection, the pair's selection is the one its conditional row
    would make on its own. Checked against `cfg_selection="per_row"`, where each row selects
    for itself: up to the first pruned step the two runs compute the conditional row
    identically (rows never mix), so the shared selection made after step t0-1 (the first,
    from the clusters) and after step t0 (the first pruned step's `next`) must equal the
    per-row selection of the conditional row, and differ from the unconditional row's."""
    config = CATConfig(keep_ratio=0.3, warmup_steps=4, num_clusters=8)
    state = get_patch(apply_cat(pipe, config)).state
    steps = (config.warmup_steps - 1, config.warmup_steps)

    def run() -> dict[int, torch.Tensor]:
        chosen = {}

        def grab(p, i, t, kw):
            if i in steps:
                chosen[i] = state.chosen.clone()
            return kw

        generate(
            pipe, prompt="a red circle", negative_prompt="a blue square", num_inference_steps=6,
            callback_on_step_end=grab,
        )  # fmt: skip
        return chosen

    shared = run()
    state = get_patch(apply_cat(pipe, config.replace(cfg_selection="per_row"))).state
    per_row = run()
    for i in steps:
        assert shared[i].shape[0] == 1 and per_row[i].shape[0] == 2
        uncond, cond = per_row[i]
        distinct = not torch.equal(uncond, cond)
        assert distinct, "rows too alike for the check to mean anything"
        follows = torch.equal(shared[i][0], cond)
        by = "the unconditional row's" if torch.equal(shared[i][0], uncond) else "neither row's"
        assert follows, f"after step {i}: the shared selection is {by}, not the conditional row's"


def _components(tokens: set[int], width: int) -> int:
    """Number of 8-connected regions the `tokens` of a row-major grid of `width` form."""
    left, count = set(tokens), 0
    while left:
        count += 1
        todo = [left.pop()]
        while todo:
            r, c = divmod(todo.pop(), width)
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    near = (r + dr) * width + c + dc
                    if 0 <= c + dc < width and near in left:
                        left.remove(near)
                        todo.append(near)
    return count


def test_clusters_live_on_the_true_token_grid():
    """A non-square call (8 x 16 token grid, wider than high) whose input moves only in its
    top-left corner between the reference and the clustering step. With position-only
    clustering the clusters must be compact, connected regions of the real grid (on a
    transposed grid each cluster becomes two strips half a row apart), and the first
    selection takes the drifting corner tokens."""
    height, width = 8, 16  # token grid; latents are 2x (patch 2)
    torch.manual_seed(0)
    model = build_transformer("tiny-sd3")
    config = CATConfig(keep_ratio=0.3, warmup_steps=2, num_clusters=8, cluster_feature_scale=0.0)
    state = get_patch(apply_cat(model, config)).state
    inputs = _inputs(1)
    latents = torch.randn(1, 16, 2 * height, 2 * width)
    moved = latents.clone()
    moved[..., :4, :4] += 3.0  # the top-left 2 x 2 tokens
    with torch.no_grad(), cat_generation(model, num_inference_steps=4):
        for x in (latents, moved):  # the reference step, then the clustering step
            model(hidden_states=x, timestep=torch.full((1,), 500.0), **inputs)
        geometry = state.schedule.geometry
        labels = state.tokens.labels[0].clone()
        first = state.chosen[0].clone()
    rows, cols = torch.arange(height * width) // width, torch.arange(height * width) % width
    position = torch.stack([rows / height, cols / width], 1)
    members = [labels == c for c in labels.unique()]
    spread = sum(position[m].var(0, unbiased=False).sum() * m.sum() for m in members)
    total = position.var(0, unbiased=False).sum() * labels.numel()
    assert spread < 0.25 * total, f"clusters are not compact: spread {spread / total:.2f}"
    for m in members:
        tokens = set(m.nonzero().flatten().tolist())
        assert _components(tokens, width) == 1, f"cluster {sorted(tokens)} is not one region"
    corner = {0, 1, width, width + 1}
    assert corner <= set(first.tolist()), "the drifting corner tokens were not selected"
    assert (geometry.height, geometry.width) == (height, width)
