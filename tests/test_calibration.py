"""A model's calibration (`catpatch.calibration`): Gram matrices of its outputs per CFG half on
a σ grid, the guided matrix of any guidance scale, interpolation to a run's σ, files, where a
patch finds one, and `calibrate` on a real (tiny) pipeline against outputs recorded by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_pipe

from catpatch.calibration import (
    CALIBRATION_FILE,
    Calibration,
    builtin_path,
    calibrate,
    find,
    interpolation,
)

GRID = np.array([1.0, 0.8, 0.55, 0.3, 0.1])


def halves(steps: int = 5, rows: int = 3, width: int = 40, seed: int = 0):
    """Random unconditional and conditional outputs (rows, steps, width), float64."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, steps, width)), rng.normal(size=(rows, steps, width))


def gram_of(x: np.ndarray) -> np.ndarray:
    """Σ over rows and features of <x_a, x_b>: (steps, steps)."""
    return np.einsum("rkd,rld->kl", x, x)


def cfg_calibration(u: np.ndarray, c: np.ndarray, sigmas=GRID) -> Calibration:
    return Calibration(
        sigmas=np.asarray(sigmas, np.float64),
        cond=gram_of(c),
        uncond=gram_of(u),
        cross=np.einsum("rkd,rld->kl", u, c),
        captions=u.shape[0],
        model="hand-made",
    )


# ---- interpolation ---------------------------------------------------------------------------
def test_interpolation_reproduces_grid_points_exactly():
    weights = interpolation(GRID, GRID)
    assert np.array_equal(weights, np.eye(len(GRID)))
    weights = interpolation(GRID, GRID[::-1])
    assert np.array_equal(weights, np.eye(len(GRID))[::-1])


def test_interpolation_rows_sum_to_one_and_are_exact_for_cubics_in_sigma():
    at = np.array([1.2, 1.0, 0.9, 0.61, 0.3, 0.2, 0.1, 0.05, 0.0])
    weights = interpolation(GRID, at)
    assert weights.shape == (len(at), len(GRID))
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-12)
    assert (np.count_nonzero(weights, axis=1) <= 4).all()  # the 4 nearest grid values
    # inside the grid the weights reproduce any cubic in σ (cubic interpolation)
    inside = (at <= GRID.max()) & (at >= GRID.min())
    for power in (1, 2, 3):
        np.testing.assert_allclose(weights[inside] @ GRID**power, at[inside] ** power, atol=1e-12)
    # linear interpolation (2 points) has non-negative weights, as before
    assert (interpolation(GRID, at, points=2) >= -1e-15).all()
    # outside, the nearest end
    assert weights[0, 0] == 1.0 and weights[-1, -1] == 1.0 and weights[-2, -1] == 1.0
    # 0.9 lies halfway between 1.0 and 0.8: linear interpolation weighs them equally
    np.testing.assert_allclose(interpolation(GRID, at, points=2)[2, :2], [0.5, 0.5], atol=1e-12)


def test_interpolation_on_an_increasing_grid_too():
    grid = GRID[::-1].copy()
    at = np.array([0.9, 0.3, 0.2])
    np.testing.assert_allclose(interpolation(grid, at) @ grid, at, atol=1e-12)


# ---- the guided Gram matrix ------------------------------------------------------------------
@pytest.mark.parametrize("guidance", (0.0, 1.0, 3.5, 7.0, -1.0))
def test_guided_is_the_gram_of_the_guided_outputs(guidance):
    u, c = halves()
    cal = cfg_calibration(u, c)
    direct = gram_of(u + guidance * (c - u))
    np.testing.assert_allclose(cal.guided(guidance), direct, rtol=1e-10, atol=1e-8)
    assert np.allclose(cal.guided(guidance), cal.guided(guidance).T)


def test_guided_without_guidance_or_without_cfg_halves_is_the_conditional_one():
    u, c = halves()
    cal = cfg_calibration(u, c)
    assert cal.guided(None) is cal.cond
    plain = Calibration(sigmas=GRID, cond=gram_of(c))
    assert plain.guided(5.0) is plain.cond


def test_gram_at_the_own_grid_is_the_guided_matrix():
    u, c = halves()
    cal = cfg_calibration(u, c)
    run = np.append(GRID, 0.0)  # a run's σ: each step's and the end
    for guidance in (None, 4.0):
        np.testing.assert_allclose(cal.gram(run, guidance), cal.guided(guidance), atol=1e-12)


def test_gram_between_grid_points_is_the_gram_of_interpolated_outputs():
    """Outputs linear in σ between grid points: the interpolated Gram matrix is exactly the
    Gram matrix of the outputs at the run's σ."""
    u, c = halves()
    cal = cfg_calibration(u, c)
    run = np.array([0.95, 0.7, 0.4, 0.2, 0.12, 0.0])
    guided = u + 4.0 * (c - u)
    weights = interpolation(GRID, run[:-1])
    at_run = np.einsum("nk,rkd->rnd", weights, guided)
    np.testing.assert_allclose(cal.gram(run, 4.0), gram_of(at_run), rtol=1e-10, atol=1e-8)
    assert cal.gram(run, 4.0).shape == (5, 5)


# ---- files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", (True, False))
def test_save_and_load_round_trip(tmp_path, cfg):
    u, c = halves()
    cal = cfg_calibration(u, c) if cfg else Calibration(GRID, gram_of(c), captions=3, model="m")
    written = cal.save(tmp_path)
    assert written == tmp_path / CALIBRATION_FILE and written.is_file()
    for where in (tmp_path, written, str(written)):
        back = Calibration.load(where)
        assert np.array_equal(back.sigmas, cal.sigmas)
        assert np.array_equal(back.cond, cal.cond)
        if cfg:
            assert np.array_equal(back.uncond, cal.uncond)
            assert np.array_equal(back.cross, cal.cross)
        else:
            assert back.uncond is None and back.cross is None
        assert back.captions == cal.captions and back.model == cal.model
        np.testing.assert_array_equal(back.guided(3.0), cal.guided(3.0))
    named = cal.save(tmp_path / "other.safetensors")
    assert np.array_equal(Calibration.load(named).cond, cal.cond)


def test_load_of_a_missing_file_names_the_fix(tmp_path):
    for missing in (tmp_path, tmp_path / "none.safetensors", "/nonexistent"):
        with pytest.raises(FileNotFoundError, match=r"calibrate\(pipe, prompts\)\.save"):
            Calibration.load(missing)


def test_repr_says_what_it_holds():
    u, c = halves()
    assert "5 steps, 3 captions, CFG halves" in repr(cfg_calibration(u, c))
    assert "no CFG" in repr(Calibration(GRID, gram_of(c)))


def test_the_shipped_calibrations_are_well_formed():
    from catpatch.toy import weights_dir

    for path in (builtin_path(), weights_dir()):
        cal = Calibration.load(path)
        k = len(cal.sigmas)
        assert cal.cond.shape == cal.uncond.shape == cal.cross.shape == (k, k)
        assert (np.diff(cal.sigmas) < 0).all(), "the σ grid must decrease"
        guided = cal.guided(5.0)
        np.testing.assert_allclose(guided, guided.T, rtol=1e-9)
        assert np.linalg.eigvalsh(guided / np.trace(guided)).min() > -1e-9, "not a Gram matrix"


# ---- where a patch finds the calibration -----------------------------------------------------
def test_find_takes_a_calibration_or_a_path(tmp_path):
    u, c = halves()
    cal = cfg_calibration(u, c)
    assert find(cal) is cal
    cal.save(tmp_path)
    assert np.array_equal(find(str(tmp_path)).cond, cal.cond)
    assert np.array_equal(find(tmp_path / CALIBRATION_FILE).cond, cal.cond)
    with pytest.raises(FileNotFoundError, match="calibrate"):
        find(str(tmp_path / "missing"))


def test_find_reads_the_pipeline_folder_or_the_one_above_the_transformer(tmp_path):
    u, c = halves()
    cal = cfg_calibration(u, c)
    cal.save(tmp_path)
    (tmp_path / "transformer").mkdir()
    pipe = make_pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found: no warning
        pipe.register_to_config(_name_or_path=str(tmp_path))
        assert np.array_equal(find(None, pipe, pipe.transformer).cond, cal.cond)
        other = make_pipe()
        other.transformer.register_to_config(_name_or_path=str(tmp_path / "transformer"))
        assert np.array_equal(find(None, other, other.transformer).cond, cal.cond)
        assert np.array_equal(find(None, None, other.transformer).cond, cal.cond)


def test_find_without_one_warns_and_falls_back_to_the_builtin():
    pipe = make_pipe()
    with pytest.warns(UserWarning, match=r"catpatch\.calibrate\(pipe, prompts\)"):
        cal = find(None, pipe, pipe.transformer)
    assert np.array_equal(cal.cond, Calibration.load(builtin_path()).cond)


# ---- calibrate on a real pipeline ------------------------------------------------------------
CALL = dict(height=64, width=64, guidance_scale=4.0)


def recorded_by_hand(pipe, prompts, steps, seeds):
    """The transformer's outputs of unpatched runs, (rows, steps, features) per call batch."""
    outputs = []
    handle = pipe.transformer.register_forward_hook(
        lambda m, a, out: outputs.append(out[0].detach().double().flatten(1).clone())
    )
    try:
        runs = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            outputs.clear()
            pipe(
                prompt=[prompt], generator=[torch.Generator().manual_seed(seed)],
                num_inference_steps=steps, output_type="latent", **CALL,
            )  # fmt: skip
            runs.append(torch.stack(outputs, 1).numpy())
    finally:
        handle.remove()
    return np.concatenate(runs, 0)


def test_calibrate_keeps_the_cfg_halves_of_the_model_outputs():
    pipe = make_pipe()
    prompts, steps, seeds = ["a red circle", "a blue square"], 6, [3, 5]
    cal = calibrate(pipe, prompts, num_inference_steps=steps, seeds=seeds, batch_size=1, **CALL)
    stack = recorded_by_hand(pipe, prompts, steps, seeds)  # (2 rows per prompt, steps, D)
    u, c = stack[0::2], stack[1::2]  # each call: unconditional row first
    assert cal.captions == 2 and "SD3Transformer2DModel" in cal.model
    assert cal.sigmas.shape == (steps,) and (np.diff(cal.sigmas) < 0).all()
    pipe.scheduler.set_timesteps(steps)
    np.testing.assert_allclose(cal.sigmas, pipe.scheduler.sigmas[:steps].numpy(), atol=1e-6)
    np.testing.assert_allclose(cal.cond, gram_of(c), rtol=1e-6)
    np.testing.assert_allclose(cal.uncond, gram_of(u), rtol=1e-6)
    np.testing.assert_allclose(cal.cross, np.einsum("rkd,rld->kl", u, c), rtol=1e-6)
    np.testing.assert_allclose(cal.guided(4.0), gram_of(u + 4.0 * (c - u)), rtol=1e-6)


def test_calibrate_batches_like_one_prompt_at_a_time():
    pipe = make_pipe()
    prompts = ["a red circle", "a blue square", "a green circle"]
    one = calibrate(pipe, prompts, num_inference_steps=5, batch_size=1, **CALL)
    two = calibrate(pipe, prompts, num_inference_steps=5, batch_size=2, **CALL)
    np.testing.assert_allclose(two.guided(4.0), one.guided(4.0), rtol=1e-4)


def test_calibrate_without_cfg_keeps_one_matrix():
    pipe = make_pipe()
    cal = calibrate(
        pipe, ["a red circle"], num_inference_steps=4, **{**CALL, "guidance_scale": 1.0}
    )
    assert cal.uncond is None and cal.cross is None and cal.cond.shape == (4, 4)


def test_the_fix_the_messages_name_exists():
    import catpatch

    with pytest.raises(FileNotFoundError) as err:
        Calibration.load("/nonexistent")
    assert "catpatch.calibrate(pipe, prompts)" in str(err.value)
    assert hasattr(catpatch, "calibrate"), "the message names catpatch.calibrate: not exported"
    assert hasattr(catpatch, "Calibration"), "CATConfig names catpatch.Calibration: not exported"
