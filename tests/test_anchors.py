"""Anchors in budgeted runs (`CATConfig(macs=B, anchors=k)`): the cluster correction on
hand-made tensors, the anchor policy, configuration and refusals, three-way pipeline runs and
the census of an anchor step at SD3-medium size (block level: test_anchors_block.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import check_selection, generate, instance_state, make_pipe, policy_after_first

from catpatch import CATConfig, apply_cat, cat_stats, is_patched, remove_cat
from catpatch.caches import gather_tokens
from catpatch.calibration import builtin_path, calibrate
from catpatch.census import census
from catpatch.correction import cluster_correction
from catpatch.models.shapes import SHAPES
from catpatch.patching import get_patch
from catpatch.stats import ModelDims

ROWS, TOKENS, FEATURES, CLUSTERS = 2, 12, 5, 3


# ---- the correction on hand-made tensors -----------------------------------------------------
def _labels() -> torch.Tensor:
    """Two rows, three clusters of four tokens, laid out differently in each row."""
    tokens = torch.arange(TOKENS)
    return torch.stack([tokens % CLUSTERS, tokens // 4])


def _anchors(labels: torch.Tensor, per_cluster: dict[int, int]) -> torch.Tensor:
    """The first `per_cluster[c]` tokens of each cluster c, per row: (R, S) sorted."""
    picks = []
    for row in labels:
        chosen = [i for c, k in per_cluster.items() for i in (row == c).nonzero()[:k, 0].tolist()]
        picks.append(sorted(chosen))
    return torch.tensor(picks)


def _image_rows(index: torch.Tensor) -> torch.Tensor:
    """The anchors' rows in the flattened (R·L, F) output."""
    return (index + TOKENS * torch.arange(index.shape[0])[:, None]).reshape(-1)


def _case(per_cluster: dict[int, int], seed: int = 0):
    """Truth, a forecast off by one error per cluster (e (R, C, F)), and the anchors."""
    gen = torch.Generator().manual_seed(seed)
    labels = _labels()
    truth = torch.randn(ROWS, TOKENS, FEATURES, generator=gen)
    error = torch.randn(ROWS, CLUSTERS, FEATURES, generator=gen)
    forecast = truth - gather_tokens(error, labels)
    index = _anchors(labels, per_cluster)
    return truth, error, forecast, labels, index


def _correct(forecast, computed, index, labels, gain=1.0):
    return cluster_correction(forecast, computed, index, _image_rows(index), labels, CLUSTERS, gain)


def _mask(index: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(ROWS, TOKENS, dtype=torch.bool)
    for r in range(ROWS):
        mask[r, index[r]] = True
    return mask


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exact_anchors_of_a_shared_error_recover_the_truth(k):
    truth, _, forecast, labels, index = _case({c: k for c in range(CLUSTERS)})
    corrected = _correct(forecast, gather_tokens(truth, index), index, labels)
    torch.testing.assert_close(corrected, truth, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gain", [0.0, 0.5, 1.0, 2.0])
def test_gain_scales_the_shift_and_anchors_keep_their_output(gain):
    truth, error, forecast, labels, index = _case({c: 1 for c in range(CLUSTERS)})
    computed = gather_tokens(truth, index) + 0.25  # anchors need not be the truth
    corrected = _correct(forecast, computed, index, labels, gain)
    anchors = _mask(index)
    torch.testing.assert_close(corrected[anchors], computed.reshape(-1, FEATURES))
    # one anchor per cluster: trust 1, every other token moves by gain·(its anchor's error)
    anchor_error = computed - gather_tokens(forecast, index)
    shift = torch.zeros(ROWS, CLUSTERS, FEATURES)
    for r in range(ROWS):
        shift[r, labels[r, index[r]]] = anchor_error[r]
    expected = forecast + gain * gather_tokens(shift, labels)
    torch.testing.assert_close(corrected[~anchors], expected[~anchors], atol=1e-6, rtol=1e-6)
    if gain == 0:
        assert torch.equal(corrected[~anchors], forecast[~anchors])


def test_a_cluster_without_anchors_is_unchanged():
    truth, _, forecast, labels, index = _case({0: 2, 1: 1})
    corrected = _correct(forecast, gather_tokens(truth, index), index, labels)
    lonely = labels == 2
    assert torch.equal(corrected[lonely], forecast[lonely])
    anchored = (labels < 2) & ~_mask(index)
    torch.testing.assert_close(corrected[anchored], truth[anchored], atol=1e-5, rtol=1e-5)


def _two_anchor_errors(mean: torch.Tensor, deviation: torch.Tensor):
    """Cluster 0 with two anchors whose errors are mean ± deviation; clusters 1, 2 exact."""
    truth, _, forecast, labels, index = _case({0: 2, 1: 1, 2: 1})
    computed = gather_tokens(truth, index).clone()
    errors = computed - gather_tokens(forecast, index)
    for r in range(ROWS):
        first, second = (labels[r, index[r]] == 0).nonzero()[:, 0].tolist()
        for j, sign in ((first, 1), (second, -1)):
            computed[r, j] = forecast[r, index[r, j]] + mean[r] + sign * deviation[r]
            errors[r, j] = mean[r] + sign * deviation[r]
    return truth, forecast, labels, index, computed


def test_disagreeing_anchors_are_not_trusted():
    mean = torch.full((ROWS, FEATURES), 0.01)
    deviation = torch.randn(ROWS, FEATURES, generator=torch.Generator().manual_seed(3))
    truth, forecast, labels, index, computed = _two_anchor_errors(mean, deviation)
    corrected = _correct(forecast, computed, index, labels)
    anchors = _mask(index)
    first = (labels == 0) & ~anchors
    assert torch.equal(corrected[first], forecast[first])  # trust 0: no shift
    torch.testing.assert_close(corrected[anchors], computed.reshape(-1, FEATURES))
    others = (labels > 0) & ~anchors
    torch.testing.assert_close(corrected[others], truth[others], atol=1e-5, rtol=1e-5)


def test_partly_agreeing_anchors_shift_by_the_shrunk_mean():
    """errors m ± d: var(mean) = |d|², trust = 1 - |d|²/|m|² (positive-part James-Stein)."""
    gen = torch.Generator().manual_seed(4)
    mean = torch.randn(ROWS, FEATURES, generator=gen)
    deviation = 0.3 * torch.randn(ROWS, FEATURES, generator=gen)
    _, forecast, labels, index, computed = _two_anchor_errors(mean, deviation)
    corrected = _correct(forecast, computed, index, labels)
    trust = 1 - deviation.square().sum(-1) / mean.square().sum(-1)
    assert (trust > 0).all() and (trust < 1).all()
    first = (labels == 0) & ~_mask(index)
    for r in range(ROWS):
        expected = forecast[r, first[r]] + trust[r] * mean[r]
        torch.testing.assert_close(corrected[r, first[r]], expected, atol=1e-5, rtol=1e-5)


def test_bf16_in_bf16_out():
    truth, _, forecast, labels, index = _case({c: 2 for c in range(CLUSTERS)})
    computed = gather_tokens(truth, index)
    low = _correct(forecast.bfloat16(), computed.bfloat16(), index, labels)
    assert low.dtype == torch.bfloat16 and low.shape == forecast.shape
    torch.testing.assert_close(low.float(), truth, atol=0.05, rtol=0.02)


# ---- the anchor policy -----------------------------------------------------------------------
def _anchor_config(**kwargs) -> CATConfig:
    return CATConfig(macs=0.5, num_clusters=4, **{"anchors": 2, **kwargs})


def _per_cluster(policy, index: torch.Tensor) -> list[list[int]]:
    labels = policy.labels
    return [torch.bincount(labels[g, index[g]], minlength=4).tolist() for g in range(len(index))]


@pytest.mark.parametrize("choice", ["score", "random"])
@pytest.mark.parametrize("anchors", [1, 2, 3])
def test_first_picks_k_tokens_of_every_cluster(anchors, choice):
    config = _anchor_config(anchors=anchors, anchor_choice=choice)
    policy, output, first, budget = policy_after_first(config)
    assert type(policy).__name__ == "AnchorPolicy"
    assert budget == anchors * 4 and first.shape == (2, budget)
    check_selection(first, budget, 96)
    sizes = [torch.bincount(row, minlength=4) for row in policy.labels]
    assert all(int(s.min()) >= anchors for s in sizes)
    assert _per_cluster(policy, first) == [[anchors] * 4] * 2
    following = policy.next(output + torch.randn(output.shape), first)
    check_selection(following, budget, 96)
    assert _per_cluster(policy, following) == [[anchors] * 4] * 2


def test_random_anchors_depend_on_the_seed_and_the_step():
    _, output, first, _ = policy_after_first(_anchor_config(anchor_choice="random"))
    _, _, other_seed, _ = policy_after_first(_anchor_config(anchor_choice="random", seed=1))
    policy, _, again, _ = policy_after_first(_anchor_config(anchor_choice="random"))
    assert torch.equal(first, again) and not torch.equal(first, other_seed)
    following = policy.next(output, first)
    assert not torch.equal(following, first)


def test_score_anchors_are_the_tokens_that_moved_most_in_their_cluster():
    policy, output, first, _ = policy_after_first(_anchor_config())
    gen = torch.Generator().manual_seed(5)
    moved = output + torch.randn(output.shape, generator=gen) * torch.rand(
        output.shape[:2], generator=gen
    ).unsqueeze(-1)
    following = policy.next(moved, first)
    # the reference is the computed step's output; the last anchors' recency is now 1
    delta = (moved - output).norm(dim=-1)
    recency = torch.zeros_like(delta).scatter_(1, first, 1.0)
    score = delta / (1 + recency)
    for g, row in enumerate(policy.labels):
        expected = [
            i
            for c in range(4)
            for i in (row == c).nonzero()[:, 0][score[g, row == c].topk(2).indices].tolist()
        ]
        assert following[g].tolist() == sorted(expected)


def test_a_computed_step_does_not_repeat_the_last_anchors():
    policy, output, first, _ = policy_after_first(_anchor_config())
    gen = torch.Generator().manual_seed(6)
    policy.next(output + 0.1 * torch.randn(output.shape, generator=gen), first)
    recency = policy.recency.clone()  # 1 for the anchors of `first`, 0 for the rest
    assert recency.gather(1, first).eq(1).all() and recency.sum() == first.numel()
    # another computed step (same clusters): 22 never-anchored tokens in every cluster, and
    # the score (drift × staleness) should prefer them to the tokens just anchored
    again = policy.first(output + 0.01 * torch.randn(output.shape, generator=gen))
    assert _per_cluster(policy, again) == [[2] * 4] * 2
    assert recency.gather(1, again).max() == 0, (first, again)


# ---- configuration and refusals --------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        (dict(anchors=1, macs=None), "give macs= too"),
        (dict(macs=0.4, anchors=-1), "anchors.*must be an int >= 0"),
        (dict(macs=0.4, anchors=1.0), "anchors.*must be an int >= 0"),
        (dict(macs=0.4, anchors=True), "anchors.*must be an int >= 0"),
        (dict(macs=0.4, anchors=1, anchor_choice="x"), "anchor_choice.*must be one of"),
        (dict(macs=0.4, anchors=1, anchor_gain=3), r"anchor_gain.*\[0, 2\]"),
        (dict(macs=0.4, anchors=1, anchor_gain=-0.1), r"anchor_gain.*\[0, 2\]"),
        (dict(macs=0.4, anchors=1, lean=False), "anchors need lean=True"),
    ],
)
def test_bad_anchor_settings_name_the_fix(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        CATConfig(**kwargs)


def test_anchor_budget_is_anchors_per_cluster():
    config = CATConfig(macs=0.4, anchors=2, num_clusters=20)
    assert config.budget(4096) == 40 and config.budget(16) == 16
    assert CATConfig(macs=0.4).budget(4096) == int(0.3 * 4096)


@pytest.mark.parametrize("shape", ["tiny-flux", "tiny-pixart-sigma"])
def test_other_families_refuse_anchors_and_stay_as_they_were(shape):
    pipe = make_pipe(shape)
    before = instance_state(pipe)
    with pytest.raises(NotImplementedError, match="anchors"):
        apply_cat(pipe, CATConfig(macs=0.5, anchors=1, num_clusters=4))
    assert not is_patched(pipe) and instance_state(pipe) == before
    # an existing patch survives the refused one
    config = CATConfig(selection="cat", warmup_steps=4, num_clusters=8)
    apply_cat(pipe, config)
    with pytest.raises(NotImplementedError, match="anchors"):
        apply_cat(pipe, CATConfig(macs=0.5, anchors=1, num_clusters=4))
    assert get_patch(pipe).config is config
    remove_cat(pipe)
    assert instance_state(pipe) == before


# ---- tiny SD3 pipelines: three-way ---------------------------------------------------------
ANCHORED = dict(macs=0.5, anchors=1, num_clusters=4)  # 256 image tokens at 128², 4 anchors


@pytest.fixture(scope="module")
def tiny_calibration():
    return calibrate(
        make_pipe(), ["a red circle", "a blue square"], num_inference_steps=20,
        height=128, width=128,
    )  # fmt: skip


@pytest.fixture(scope="module")
def unpatched():
    pipe = make_pipe()
    return generate(pipe), generate(pipe, seed=1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def check_anchored_run(pipe, budget: float = 0.5, steps: int = 10):
    stats = cat_stats(pipe)
    plan = stats.plan
    assert stats.steps == steps and plan is not None and plan.steps == steps
    assert 0 < stats.macs_ratio <= budget + 0.01, stats.macs_ratio
    modes = [mode for mode, _, _ in stats.per_step]
    assert modes == ["record" if s in plan.computed else "pruned" for s in range(steps)], modes
    assert stats.pruned_steps == steps - len(plan.computed) > 0
    assert all(sel == stats.budget for mode, sel, _ in stats.per_step if mode == "pruned")
    # the anchors are paid for: the plan priced them, and the run cost what the plan said
    assert 0 < plan.step_cost < 0.2
    assert stats.macs_ratio == pytest.approx(plan.macs, rel=1e-9)
    assert "1 anchors per cluster" in stats.summary()
    return stats


def test_anchored_run_keeps_the_budget_and_the_image(tiny_calibration, unpatched):
    reference, other = unpatched
    pipe = make_pipe()
    apply_cat(pipe, CATConfig(**ANCHORED, calibration=tiny_calibration))
    anchored = generate(pipe)
    stats = check_anchored_run(pipe)
    assert stats.budget == 4 and stats.tokens == 256
    # three-way: moved from the unpatched image, but far closer to it than another seed
    assert np.isfinite(anchored).all() and not np.array_equal(anchored, reference)
    assert _psnr(anchored, reference) > 30 > _psnr(other, reference) + 10  # measured: 51, 14
    assert np.array_equal(generate(pipe), anchored), "a second generation differs"
    remove_cat(pipe)
    assert np.array_equal(generate(pipe), reference)


def test_anchor_gain_changes_the_result(tiny_calibration, unpatched):
    reference, _ = unpatched
    pipe = make_pipe()
    images = {}
    for gain in (0.0, 1.0):
        apply_cat(pipe, CATConfig(**ANCHORED, anchor_gain=gain, calibration=tiny_calibration))
        images[gain] = generate(pipe)
        check_anchored_run(pipe)
        assert np.isfinite(images[gain]).all()
        assert _psnr(images[gain], reference) > 30
    assert not np.array_equal(images[0.0], images[1.0])


def test_random_anchors_run(tiny_calibration, unpatched):
    pipe = make_pipe()
    config = CATConfig(**ANCHORED, anchor_choice="random", calibration=tiny_calibration)
    apply_cat(pipe, config)
    image = generate(pipe)
    check_anchored_run(pipe)
    assert np.isfinite(image).all() and _psnr(image, unpatched[0]) > 30


def test_persistent_buffers_first_generation_matches_a_fresh_run(tiny_calibration):
    pipe = make_pipe()
    apply_cat(pipe, CATConfig(**ANCHORED, calibration=tiny_calibration))
    fresh = generate(pipe)
    apply_cat(pipe, CATConfig(**ANCHORED, calibration=tiny_calibration, persistent_buffers=True))
    assert np.array_equal(generate(pipe), fresh)


def test_persistent_buffers_give_the_same_image_every_generation(tiny_calibration):
    pipe = make_pipe()
    apply_cat(pipe, CATConfig(**ANCHORED, calibration=tiny_calibration, persistent_buffers=True))
    first = generate(pipe)
    assert np.array_equal(generate(pipe), first)  # measured: differs by up to 0.006


def test_dual_attention_pipeline_runs_with_anchors(tiny_calibration):
    pipe = make_pipe("tiny-sd3.5-medium")
    reference, other = generate(pipe), generate(pipe, seed=1)
    apply_cat(pipe, CATConfig(**ANCHORED, calibration=tiny_calibration))
    anchored = generate(pipe)
    check_anchored_run(pipe)
    assert np.isfinite(anchored).all() and not np.array_equal(anchored, reference)
    assert _psnr(anchored, reference) > _psnr(other, reference) + 10


# ---- census at the real SD3-medium size (meta device) ----------------------------------------
@pytest.fixture(scope="module")
def anchor_census():
    configs = {k: CATConfig(macs=0.4, anchors=k, calibration=builtin_path()) for k in (1, 2)}
    return {k: census("sd3-medium", 1024, 1024, config) for k, config in configs.items()}


@pytest.mark.parametrize("anchors", [1, 2])
def test_anchor_step_costs_a_few_percent_of_a_full_step(anchor_census, anchors):
    c = anchor_census[anchors]
    full, record, pruned = c.full, c.record, c.pruned
    assert full.flops > 0 and pruned.flops > 0
    assert pruned.flops <= 0.05 * full.flops  # measured 0.005 (1 anchor per cluster)
    assert pruned.other_bytes <= 0.10 * full.other_bytes  # measured 0.014
    assert pruned.kernels < full.kernels
    assert record.flops == pytest.approx(full.flops, rel=0.01)  # a computed step is full
    # the stats cost model agrees with what the anchor step dispatched (FLOPs = 2·MACs)
    dims = ModelDims.from_config(SHAPES["sd3-medium"])
    tokens, text = (1024 // 16) ** 2, 333
    budget = c.config.budget(tokens)
    assert budget == 20 * anchors
    model = dims.step_macs(tokens, text, budget, lean=True, text_cached=True) / dims.step_macs(
        tokens, text
    )
    assert model == pytest.approx(pruned.flops / full.flops, rel=0.1)
    # text_cached is what makes it cheap: with the text stream a step would cost ~8% (model)
    assert dims.step_macs(tokens, text, budget, lean=True) / dims.step_macs(tokens, text) > 0.06


def test_two_anchors_cost_more_than_one(anchor_census):
    one, two = anchor_census[1].pruned, anchor_census[2].pruned
    assert one.flops < two.flops < 2.5 * one.flops
