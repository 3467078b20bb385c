"""First-order forecast of the tokens a pruned step does not compute (`token_order=1`)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import generate, make_pipe

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat
from catpatch.caches import rows_index
from catpatch.forecast import TokenForecast
from catpatch.patching import get_patch


def _rows(index: torch.Tensor, tokens: int) -> torch.Tensor:
    return (index + torch.arange(index.shape[0])[:, None] * tokens).view(-1)


def test_linear_trajectories_are_forecast_exactly():
    """Tokens whose outputs move linearly in the timestep are forecast exactly, whichever
    steps computed them; the tokens just computed give their new output."""
    gen = torch.Generator().manual_seed(0)
    rows, tokens, features, budget = 2, 24, 5, 6
    start = torch.randn(rows, tokens, features, generator=gen)
    velocity = torch.randn(rows, tokens, features, generator=gen)

    def truth(t: float) -> torch.Tensor:
        return start + velocity * t

    times = [1000.0, 960.0, 900.0, 830.0, 750.0, 640.0]
    forecast = TokenForecast()
    forecast.observe_reference(truth(times[0]), torch.full((rows,), times[0]))
    previous = truth(times[1]).clone()
    forecast.start(previous, torch.full((rows,), times[1]))
    for t in times[2:]:
        index = torch.randperm(tokens, generator=gen)[:budget].expand(rows, budget).contiguous()
        now = torch.full((rows,), t)
        computed = truth(t).gather(1, rows_index(index, previous.shape))
        rows_of = _rows(index, tokens)
        forecast.update(previous, index, rows_of, computed, now)
        previous.view(-1, features).index_copy_(0, rows_of, computed.view(-1, features))
        out = forecast.apply(previous, now)
        torch.testing.assert_close(out, truth(t), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.gather(1, rows_index(index, out.shape)), computed)
        # zeroth order would be wrong for every token not computed now
        assert (previous - truth(t)).abs().amax() > 1e-2


def test_a_repeated_timestep_gives_finite_outputs():
    forecast = TokenForecast()
    output = torch.randn(1, 4, 3)
    same = torch.tensor([500.0])
    forecast.observe_reference(output, same)
    forecast.start(output + 1, same)
    assert torch.equal(forecast.slope, torch.zeros_like(forecast.slope))
    assert torch.isfinite(forecast.apply(output, torch.tensor([400.0]))).all()


CFG = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=4)


def test_forecast_in_a_pipeline_changes_only_what_zeroth_order_reuses():
    pipe = make_pipe()
    apply_cat(pipe, CFG)
    zeroth = generate(pipe)
    apply_cat(pipe, CFG.replace(token_order=1))
    first = generate(pipe)
    stats = cat_stats(pipe)
    # with every token computed, there is nothing to forecast
    apply_cat(pipe, CFG.replace(keep_ratio=1.0, token_order=1))
    every = generate(pipe)
    apply_cat(pipe, CFG.replace(keep_ratio=1.0))
    every_zeroth = generate(pipe)
    remove_cat(pipe)
    assert stats.pruned_steps == 6 and stats.cache_bytes > 0
    assert np.isfinite(first).all()
    assert np.abs(first - zeroth).max() > 1e-3, "token_order=1 changed nothing"
    np.testing.assert_array_equal(every, every_zeroth)


def test_forecast_state_is_counted_and_freed():
    pipe = make_pipe()
    apply_cat(pipe, CFG)
    generate(pipe)
    plain = cat_stats(pipe).cache_bytes
    apply_cat(pipe, CFG.replace(token_order=1))
    generate(pipe)
    stats = cat_stats(pipe)
    state = get_patch(pipe).state
    config = pipe.transformer.config
    features = config.patch_size**2 * config.out_channels
    remove_cat(pipe)
    # slope (R, L, F) and stamp (R, L, 1), float32
    assert stats.cache_bytes - plain == stats.rows * stats.tokens * (features + 1) * 4
    assert state.forecast.tensors() == []
