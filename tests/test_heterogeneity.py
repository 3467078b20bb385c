"""The change-heterogeneity measurement: its tensor functions on hand-made tensors, the
recorder against the pipeline's own latents, and `catpatch heterogeneity` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_pipe

from catpatch import CATConfig, apply_cat, remove_cat
from catpatch.analysis import heterogeneity as het
from catpatch.cli import main


def test_top_share_concentrated_uniform_and_partial():
    change = torch.zeros(3, 10)
    change[0, [1, 4, 7]] = torch.tensor([5.0, 2.0, 1.0])  # all change on 30% of the tokens
    change[1] = 2.0  # uniform: the top 3 of 10 carry 0.3
    change[2, :5] = 1.0  # on half of them: the top 3 carry 3/5
    torch.testing.assert_close(het.top_share(change), torch.tensor([1.0, 0.3, 0.6]))
    assert het.top_count(256, 0.3) == 76  # ⌊0.3·256⌋, CAT's S at α 0.3
    assert torch.isnan(het.top_share(torch.zeros(1, 10))).all()  # nothing changed


def test_rank_correlation_identical_reversed_and_ties():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 50, generator=gen)
    torch.testing.assert_close(het.rank_correlation(a, a), torch.ones(2, 3))
    torch.testing.assert_close(het.rank_correlation(a, 10 * a.exp()), torch.ones(2, 3))
    torch.testing.assert_close(het.rank_correlation(a, -a), -torch.ones(2, 3))
    # ties take their average rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4)
    rho = het.rank_correlation(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.arange(4.0))
    assert rho.shape == () and math.isclose(float(rho), 4.5 / math.sqrt(4.5 * 5), rel_tol=1e-5)


def test_token_change_and_relative_change():
    velocity = torch.zeros(1, 3, 2, 2)
    velocity[0, 1, 0] = torch.tensor([3.0, 4.0])  # token 0 moves by 5 at step 1
    velocity[0, 2] = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # token 1 by 1 at step 2
    change = het.token_change(velocity)
    assert torch.isnan(change[0, 0]).all()
    assert change[0, 1:].tolist() == [[5.0, 0.0], [0.0, 1.0]]
    moved = het.relative_change(velocity)
    assert math.isnan(moved[0, 0]) and math.isinf(moved[0, 1]) and moved[0, 2] == 1 / 5


def test_patch_tokens_inverts_the_sd3_unpatchify():
    """Tokens (B, L, p·p·C) un-patchified as `SD3Transformer2DModel.forward` does come back
    unchanged from `patch_tokens`."""
    batch, h, w, p, c = 2, 3, 4, 2, 5
    tokens = torch.randn(batch, h * w, p * p * c)
    grid = tokens.reshape(batch, h, w, p, p, c)
    sample = torch.einsum("nhwpqc->nchpwq", grid).reshape(batch, c, h * p, w * p)
    assert torch.equal(het.patch_tokens(sample, p), tokens)


def _steady(steps: int = 6, tokens: int = 20) -> torch.Tensor:
    """v_t = t²·w: token i changes by (2t-1)·w_i at step t, always the same tokens ranked the
    same way; 30% of the tokens (6 of 20) carry weight 10, the rest 1."""
    weight = torch.ones(tokens)
    weight[[2, 5, 7, 11, 13, 17]] = 10.0
    weight = weight + 1e-3 * torch.arange(tokens)  # distinct: no ties
    t = torch.arange(steps, dtype=torch.float32)
    return (t[:, None, None] ** 2 * weight[None, :, None]).expand(-1, -1, 3)[None].clone()


def test_step_stats_on_a_steady_field():
    velocity = torch.cat([_steady(), _steady()])
    stats = het.step_stats(velocity, warmup_steps=3)
    assert [s.step for s in stats] == [1, 2, 3, 4, 5]
    assert [s.pruned for s in stats] == [False, False, True, True, True]
    assert stats[0].step_rho is None and stats[1].reference_rho is None
    weight = velocity[0, 1, :, 0]
    share = float(weight.topk(6).values.sum() / weight.sum())
    for s in stats:
        assert math.isclose(s.top_share[0], share, rel_tol=1e-5)
    for s in stats[1:]:
        assert math.isclose(s.step_rho[0], 1.0, rel_tol=1e-5)
    average = het.pruned_average(stats)
    assert math.isclose(average["reference_rho"], 1.0, rel_tol=1e-5)
    assert math.isclose(average["top_share"], share, rel_tol=1e-5)
    # the moving tokens swap each step: change w on odd steps, w reversed on even ones
    w = torch.arange(1.0, 21.0)
    moves = torch.stack([w if t % 2 else w.flip(0) for t in range(6)])
    swapping = het.step_stats(moves.cumsum(0)[None, :, :, None], warmup_steps=3)
    assert [round(s.step_rho[0], 4) for s in swapping[1:]] == [-1.0] * 4
    assert [round(s.reference_rho[0], 4) for s in swapping[2:]] == [-1.0, 1.0, -1.0]
    with pytest.raises(ValueError, match="warmup_steps"):
        het.step_stats(velocity, warmup_steps=6)


def test_normalised_maps():
    maps = het.normalised_maps(torch.tensor([[0.0, 2.0, 4.0, 1.0], [0.0] * 4]), 2, 2)
    assert maps.tolist() == [[[0.0, 0.5], [1.0, 0.25]], [[0.0, 0.0], [0.0, 0.0]]]


def test_normalised_maps_on_a_non_square_grid():
    """Tokens in raster order on a 2 x 3 grid: token r·W + c lands in row r, column c (a
    square grid cannot tell rows from columns)."""
    change = 2.0 ** torch.arange(6.0)[None]  # one map, peak 32 (powers of 2: exact ratios)
    maps = het.normalised_maps(change, 2, 3)
    assert maps.shape == (1, 2, 3)
    assert maps[0].tolist() == [[1 / 32, 1 / 16, 1 / 8], [1 / 4, 1 / 2, 1.0]]


def test_step_stats_report_the_standard_error_over_the_images():
    """Each measure's error is the standard error of its mean over the N images, s/√N (s the
    sample standard deviation), not s itself."""
    velocity = torch.randn(5, 4, 12, 3, generator=torch.Generator().manual_seed(2))
    stats = het.step_stats(velocity, warmup_steps=2)
    share = het.top_share(het.token_change(velocity)).double()  # (N, T), per image
    moved = het.relative_change(velocity).double()
    for s in stats:
        for got, each in ((s.top_share, share[:, s.step]), (s.relative_change, moved[:, s.step])):
            assert math.isclose(got[0], float(each.mean()), rel_tol=1e-9)
            assert math.isclose(got[1], float(each.std() / math.sqrt(5)), rel_tol=1e-9)
    assert stats[0].row()["top_share_se"] == stats[0].top_share[1]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_recorded_velocity_is_what_the_sampler_integrates(guidance):
    """The recorded (guided) velocity of each step reproduces the pipeline's own Euler step:
    x_(t+1) - x_t = (sigma_(t+1) - sigma_t)·v_t, latents read by `callback_on_step_end`. Under
    CFG the conditional row alone does not."""
    pipe = make_pipe()
    steps, kwargs = 4, dict(height=64, width=64, guidance_scale=guidance)
    latents = []

    def keep(pipe_, step, timestep, tensors):
        latents.append(het.patch_tokens(tensors["latents"].float(), 2))
        return tensors

    recording = het.record_velocities(
        pipe, ["a red circle", "a blue square"], [0, 1], batch_size=2, num_inference_steps=steps,
        callback_on_step_end=keep, **kwargs,
    )  # fmt: skip
    channels = pipe.transformer.config.out_channels
    assert recording.velocity.shape == (2, steps, 8 * 8, 2 * 2 * channels)  # VAE scale 4, p 2
    assert recording.grid == (8, 8) and recording.images.shape[0] == 2
    sigmas = pipe.scheduler.sigmas
    seed = torch.Generator().manual_seed(0)  # image 0's noise, as the pipeline draws it
    noise = pipe.prepare_latents(1, channels, 64, 64, torch.float32, "cpu", seed)
    start = het.patch_tokens(noise, 2)
    path = torch.stack([start[0]] + [x[0] for x in latents])  # image 0: x_0 .. x_T
    for t in range(steps):
        step = (sigmas[t + 1] - sigmas[t]) * recording.velocity[0, t]
        torch.testing.assert_close(path[t + 1] - path[t], step, atol=1e-5, rtol=1e-4)
    cond = het.record_velocities(
        pipe, ["a red circle"], [0], rows="cond", num_inference_steps=steps, **kwargs
    )
    differs = not torch.allclose(cond.velocity[0], recording.velocity[0], atol=1e-5)
    assert differs == (guidance > 1)


def test_recorder_refuses_a_patched_pipeline():
    pipe = make_pipe()
    apply_cat(pipe, CATConfig(selection="cat", warmup_steps=2, num_clusters=4))
    with pytest.raises(ValueError, match="unpatched"):
        het.record_velocities(pipe, ["a"], [0], num_inference_steps=3)
    remove_cat(pipe)
    with pytest.raises(ValueError, match="rows"):
        het.record_velocities(pipe, ["a"], [0], rows="uncond", num_inference_steps=3)


def _check_outputs(out, steps: int, images: int) -> dict:
    lines = [json.loads(x) for x in (out / "heterogeneity.jsonl").read_text().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert [r["step"] for r in rows] == list(range(1, steps))
    assert summary["summary"] and summary["images"] == images
    pruned = [r for r in rows if r["pruned"]]
    for name in ("top_share", "step_rho", "reference_rho"):
        mean = np.mean([r[name] for r in pruned])
        assert math.isclose(summary["pruned_average"][name], mean, rel_tol=1e-9)
    assert all(0 < r["top_share"] <= 1 for r in rows)
    assert "pruned mean" in (out / "heterogeneity.md").read_text()
    from PIL import Image

    with Image.open(out / "heterogeneity.png") as picture:
        assert picture.width > 300 and picture.height > 100
    return summary


def test_command_on_the_toy(tmp_path, capsys):
    out = tmp_path / "het"
    argv = ["heterogeneity", "--model", "toy", "--images", "2", "--steps", "6"]
    assert main([*argv, "--warmup-steps", "3", "--out", str(out)]) == 0
    summary = _check_outputs(out, steps=6, images=2)
    assert summary["tokens"] == 256 and summary["top_tokens"] == 76 and summary["rows"] == "guided"
    assert summary["command"].startswith("catpatch heterogeneity --model toy --images 2")
    assert "pruned mean" in capsys.readouterr().out
    assert main([*argv, "--warmup-steps", "6", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_command_on_a_pipeline_folder(tmp_path):
    """Any SD3 pipeline folder, with captions from a file (each image from seed + i)."""
    folder = tmp_path / "tiny"
    make_pipe().save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green cross\n")
    out = tmp_path / "het"
    argv = ["heterogeneity", "--model", str(folder), "--prompts-file", str(prompts)]
    argv += ["--images", "2", "--steps", "5", "--warmup-steps", "2", "--size", "64x64"]
    assert main([*argv, "--rows", "cond", "--out", str(out)]) == 0
    summary = _check_outputs(out, steps=5, images=2)
    assert summary["tokens"] == 64 and summary["rows"] == "cond"
