"""Guards on how tokens and steps are chosen: no host sync in a pruned step or in the
selection, the conditional CFG row drives a shared selection, clusters live on the true token
grid ("cat" and "paper"), step reuse spreads its skipped steps and plans the steps a pipeline
runs (img2img `strength`), skip-layer calls pass through, "random" follows its seed.

Each test here was checked to fail on a deliberate bug of its kind (see README "Development").
"""

from __future__ import annotations

import itertools
import traceback
from pathlib import Path

import pytest
import torch
from conftest import generate, make_pipe, policy_after_first
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
    config = CATConfig(
        selection="cat", keep_ratio=0.3, warmup_steps=2, num_clusters=4, token_order=token_order
    )
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
    config = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8)
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


@pytest.mark.parametrize("selection", ["cat", "paper"])
def test_clusters_live_on_the_true_token_grid(selection):
    """A non-square call (8 x 16 token grid, wider than high) whose input moves only in its
    top-left corner between the reference and the clustering step. With position-only
    clustering the clusters must be compact, connected regions of the real grid (on a
    transposed grid each cluster becomes two strips half a row apart), and the first
    selection takes the drifting corner tokens. "paper" clusters on its own grid (4
    neighbours, the position added into the channels), so it is checked too."""
    height, width = 8, 16  # token grid; latents are 2x (patch 2)
    torch.manual_seed(0)
    model = build_transformer("tiny-sd3")
    config = CATConfig(
        keep_ratio=0.3, warmup_steps=2, num_clusters=8, cluster_feature_scale=0.0,
        selection=selection,
    )  # fmt: skip
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


def _skipped(policy, steps: int) -> list[int]:
    return [s for s in range(steps) if not policy.runs_model(s)]


def test_step_reuse_spreads_its_skipped_steps():
    """The step policies ("step", "cat+reuse") space the steps that run the model evenly, so
    that the skipped ones are spread out: pinned on one plan, then as a property, no two
    skipped steps adjacent whenever fewer than half of the post-warm-up steps are skipped
    (consecutive computed steps followed by a block of skipped ones would pass every count)."""
    from catpatch.policies.step_reuse import PrunedStepReuse, StepReuse

    policy = StepReuse(CATConfig(selection="step", warmup_steps=4))
    policy.plan(14, 0.5)
    assert sorted(policy.compute_steps) == [4, 6, 8, 11, 13]
    assert _skipped(policy, 14) == [5, 7, 9, 10, 12]
    plans = [(StepReuse, "step", ratio) for ratio in (0.3, 0.5, 0.6, 0.75, 0.9)]
    plans += [(PrunedStepReuse, "cat+reuse", macs) for macs in (0.45, 0.55, 0.7, 0.85)]
    checked = 0
    for cls, selection, value in plans:
        config = CATConfig(selection=selection, warmup_steps=4, reuse_macs=value)
        for steps in range(6, 40):
            policy = cls(config)
            policy.plan(steps, value if selection == "step" else 0.4)
            skipped = _skipped(policy, steps)
            assert all(s >= 4 for s in skipped), "a warm-up step was skipped"
            if len(policy.compute_steps) > 1:
                assert steps - 1 not in skipped, "the last step must run the model"
            if skipped and 2 * len(skipped) < steps - 4:
                checked += 1
                adjacent = [(a, b) for a, b in itertools.pairwise(skipped) if b == a + 1]
                assert not adjacent, f"{selection} {value} {steps} steps: skips {adjacent}"
    assert checked > 50


def test_skip_layer_calls_with_the_same_rows_pass_through():
    """A loop of your own that makes a skip-layer-guidance call (`skip_layers=`) after each
    step, with the same batch rows as the step's call: those calls run unpruned and leave the
    run alone, so the steps' outputs and the stats equal those of the loop without them.
    (In pipelines the SLG call has B rows against the step's 2B, so a geometry check alone
    would pass it through there; here only the `skip_layers` check can.)"""
    torch.manual_seed(0)
    model = build_transformer("tiny-sd3.5-medium")
    config = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=3, num_clusters=4)
    apply_cat(model, config)
    inputs, steps = _inputs(2), 7
    start = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(2))

    def loop(slg: bool) -> tuple[torch.Tensor, object, list[torch.Tensor]]:
        latents, guided = start.clone(), []
        with torch.no_grad(), cat_generation(model, num_inference_steps=steps):
            for step in range(steps):
                t = torch.full((2,), 1000.0 - 120 * step)
                out = model(hidden_states=latents, timestep=t, **inputs).sample
                if slg:
                    skip = model(hidden_states=latents, timestep=t, skip_layers=[1], **inputs)
                    guided.append(skip.sample)
                latents = latents - 0.1 * out
        return latents, cat_stats(model), guided

    plain, plain_stats, _ = loop(slg=False)
    with_slg, stats, guided = loop(slg=True)
    taken = f"the skip_layers calls were taken as steps: {stats.steps} steps"
    assert stats.passthrough_calls == steps and plain_stats.passthrough_calls == 0, taken
    assert (stats.steps, stats.pruned_steps) == (steps, steps - config.warmup_steps)
    assert stats.per_step == plain_stats.per_step
    torch.testing.assert_close(with_slg, plain, rtol=0, atol=0)
    assert all(torch.isfinite(g).all() for g in guided)


@pytest.mark.parametrize("selection", ["cat+reuse", "step"])
def test_step_policies_plan_the_steps_img2img_runs(selection):
    """img2img at `strength` < 1 runs only the last part of the requested schedule (12 of 20
    steps at 0.6): the step policies must plan those, not the 20 requested. "cat+reuse" then
    stays within its MACs target, and "step" spends what CAT spends on the same run."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = make_pipe(pipeline_cls=StableDiffusion3Img2ImgPipeline)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    kwargs = dict(image=image, strength=0.6, num_inference_steps=20, output_type="latent")
    config = CATConfig(
        selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8, reuse_macs=0.5
    )
    apply_cat(pipe, config.replace(selection=selection))
    generate(pipe, **kwargs)
    stats = cat_stats(pipe)
    run = pipe._num_timesteps
    assert run == 12 and stats.steps == run
    assert stats.reused_steps > 0
    if selection == "cat+reuse":
        assert stats.pruned_steps + stats.reused_steps == run - config.warmup_steps
        assert stats.macs_ratio <= config.reuse_macs, (
            f"MACs {stats.macs_ratio:.3f} of unpatched, over the {config.reuse_macs} target"
        )
    # the evenly spaced plan ends on the run's last step (a plan for 20 steps ends past it)
    last = stats.per_step[-1][0]
    assert last != "reuse", f"the run's last step was skipped: {[m for m, _, _ in stats.per_step]}"
    if selection == "step":
        full = sum(mode == "full" for mode, _, _ in stats.per_step)
        assert full + stats.reused_steps == run
        apply_cat(pipe, config)
        generate(pipe, **kwargs)
        cat_ = cat_stats(pipe)
        assert cat_.steps == run
        one_step = stats.macs_unpatched / run
        assert abs(stats.macs - cat_.macs) <= one_step / 2, (
            f"step reuse MACs {stats.macs_ratio:.3f} of unpatched, CAT's {cat_.macs_ratio:.3f}"
        )


def test_random_selection_follows_its_seed(pipe):
    """selection="random" draws from its own generator seeded by `CATConfig.seed`: two
    generations with the same seeds give the same selections and images whatever else drew
    random numbers in between (the global RNG here), and another `seed` other selections."""
    config = CATConfig(keep_ratio=0.3, warmup_steps=4, num_clusters=8, selection="random")

    def run(seed: int = 0) -> tuple[list[torch.Tensor], object]:
        state = get_patch(apply_cat(pipe, config.replace(seed=seed))).state
        chosen = []

        def grab(p, i, t, kw):
            if i >= config.warmup_steps - 1:
                chosen.append(state.chosen.clone())
            return kw

        image = generate(pipe, num_inference_steps=8, callback_on_step_end=grab)
        return chosen, image

    torch.manual_seed(0)
    first, image = run()
    torch.rand(1000)  # other random draws between the generations
    second, again = run()
    assert len(first) == 5
    same = [torch.equal(a, b) for a, b in zip(first, second, strict=True)]
    assert all(same), f"same seed, other selections at pruned steps {same}"
    assert (image == again).all(), "same seed, another image"
    other, _ = run(seed=1)
    assert not torch.equal(first[0], other[0]), "the seed does not reach the selection"


def test_split_cfg_calls_are_refused_where_unsupported():
    """`cat_generation(calls_per_step=2)` is FLUX's true CFG as separate calls; on SD3 a step's
    second call selected tokens of its own (measured: the two calls of every pruned step
    computed different tokens), so it is refused with the fix, and the model stays usable."""
    from catpatch import CATConfig, apply_cat, cat_generation, remove_cat
    from catpatch.models.shapes import build_transformer

    model = build_transformer("tiny-sd3")
    apply_cat(model, CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=2, num_clusters=4))
    with (
        pytest.raises(NotImplementedError, match="cfg=True"),
        cat_generation(model, num_inference_steps=4, calls_per_step=2),
    ):
        pass
    with cat_generation(model, num_inference_steps=4, cfg=True):
        pass
    remove_cat(model)
