"""PixArt-Σ pipelines: the three-way comparison, CFG pairs, batches, resolutions and binning,
the other policies, saved folders (`DiffusionPipeline`, `catpatch generate --model`) and bad
input (mirrors test_pipeline and test_guards for SD3), on a tiny `PixArtSigmaPipeline`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import instance_state
from pixart_support import CFG, EXACT, generate, pixart

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat
from catpatch.patching import get_patch


@pytest.fixture
def pipe():
    return pixart()


# ---- the pipeline: three-way, CFG, resolutions ------------------------------------------------
def test_three_way(pipe):
    a = generate(pipe)
    before = instance_state(pipe)
    apply_cat(pipe, EXACT)
    exact = generate(pipe)
    assert cat_stats(pipe).pruned_steps == 6
    apply_cat(pipe, CFG)
    b = generate(pipe)
    stats = cat_stats(pipe)
    remove_cat(pipe)
    c = generate(pipe)
    assert np.array_equal(a, c), "removed patch must give the unpatched image bit for bit"
    assert instance_state(pipe) == before, "remove_cat left something behind"
    np.testing.assert_allclose(exact, a, atol=1e-5)
    change = np.abs(a - b).max()
    assert 1e-4 < change < 0.05, f"pruned image differs by {change}"
    assert (stats.steps, stats.pruned_steps, stats.rows) == (10, 6, 2)
    assert (stats.tokens, stats.budget, stats.text_tokens) == (256, 76, 300)
    assert stats.computed_fraction < 1.0 and stats.macs < stats.macs_unpatched


@pytest.mark.parametrize("lean", [True, False])
def test_pruned_latents_stay_close(pipe, lean):
    """Pruned at 0.3, the final latents move by a few percent at most (random weights: a
    closeness check, not a quality claim)."""
    a = generate(pipe, output_type="latent")
    apply_cat(pipe, CFG.replace(lean=lean))
    b = generate(pipe, output_type="latent")
    change = ((b - a).norm() / a.norm()).item()
    assert 1e-4 < change < 0.05, change


def test_cfg_pair_shares_the_conditional_selection(pipe):
    apply_cat(pipe, CFG)
    state, seen = get_patch(pipe).state, {}

    def grab(i, t, latents):  # PixArt's (older) step callback
        if state.index is not None:
            seen["index"] = state.index.clone()

    generate(pipe, prompt=["a red circle", "a green star"], callback=grab)
    index = seen["index"]
    assert index.shape == (4, 76) and state.schedule.cfg_rows is True
    assert torch.equal(index[0], index[2]) and torch.equal(index[1], index[3])
    assert not torch.equal(index[2], index[3])
    # without guidance: one row per image, each selecting on its own
    generate(pipe, prompt=["a red circle", "a green star"], guidance_scale=1.0, callback=grab)
    assert seen["index"].shape == (2, 76) and state.schedule.cfg_rows is False
    assert cat_stats(pipe).rows == 2 and cat_stats(pipe).pruned_steps == 6


def test_batches_are_per_sample(pipe):
    apply_cat(pipe, CFG)
    prompts = ["a red circle", "a blue square on a striped background"]
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    ab = generate(pipe, prompt=prompts, latents=latents)
    assert cat_stats(pipe).rows == 4
    ba = generate(pipe, prompt=prompts[::-1], latents=latents.flip(0))
    np.testing.assert_allclose(ab[0], ba[1], atol=2e-5)
    np.testing.assert_allclose(ab[1], ba[0], atol=2e-5)


@pytest.mark.parametrize("height,width", [(128, 192), (192, 128)])
def test_non_square_and_resolution_change(pipe, height, width):
    apply_cat(pipe, CFG)
    img = generate(pipe, height=height, width=width)
    assert img.shape == (1, height, width, 3)
    assert cat_stats(pipe).tokens == (height // 8) * (width // 8)
    img = generate(pipe, height=width, width=height)  # the same patched pipe, another shape
    assert img.shape == (1, width, height, 3) and cat_stats(pipe).pruned_steps == 6
    assert np.isfinite(img).all()


def test_resolution_binning(pipe):
    """`use_resolution_binning` (the pipeline's default): the latents take the closest bin's
    shape (here 176x352 for a 1:2 request) and the image is resized back; the token grid comes
    from the call, so CAT follows."""
    kwargs = dict(height=160, width=320, use_resolution_binning=True, num_inference_steps=8)
    a = generate(pipe, **kwargs)
    apply_cat(pipe, CFG)
    b = generate(pipe, **kwargs)
    stats = cat_stats(pipe)
    remove_cat(pipe)
    assert a.shape == b.shape == (1, 160, 320, 3)
    assert stats.tokens == (176 // 8) * (352 // 8) and stats.pruned_steps == 4
    assert np.isfinite(b).all() and np.abs(a - b).max() > 1e-4
    np.testing.assert_array_equal(generate(pipe, **kwargs), a)


@pytest.mark.parametrize(
    "changes", [dict(selection="step"), dict(selection="cat+reuse"), dict(token_order=1)]
)
def test_other_policies_run(pipe, changes):
    """Step reuse, CAT with reused steps and the first-order token forecast on PixArt."""
    a = generate(pipe, num_inference_steps=14)
    apply_cat(pipe, CFG.replace(**changes))
    b = generate(pipe, num_inference_steps=14)
    stats = cat_stats(pipe)
    assert np.isfinite(b).all() and np.abs(a - b).max() > 1e-5 and stats.steps == 14
    if "selection" in changes:
        assert stats.reused_steps > 0 and stats.macs_ratio < 1
    else:
        assert stats.pruned_steps == 10


def test_save_load_and_offline_folder(pipe, tmp_path):
    """A saved tiny PixArt-Σ folder loads with `DiffusionPipeline` and takes CAT."""
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    apply_cat(loaded, CFG)
    assert generate(loaded).shape == (1, 128, 128, 3) and cat_stats(loaded).pruned_steps == 6


def test_bad_input_leaves_pipe_untouched(pipe):
    from diffusers import PixArtAlphaPipeline
    from diffusers.models.attention_processor import AttnProcessor

    before = instance_state(pipe)
    with pytest.raises(TypeError, match="CATConfig"):
        apply_cat(pipe, {"keep_ratio": 0.3})
    with pytest.raises(ValueError, match="keep_ratio"):
        apply_cat(pipe, CATConfig(selection="cat", keep_ratio=1.5))
    alpha = PixArtAlphaPipeline(**pipe.components)
    with pytest.raises(TypeError, match="PixArtSigmaPipeline"):
        apply_cat(alpha, CFG)
    from diffusers import PixArtSigmaPAGPipeline

    pag = PixArtSigmaPAGPipeline(**pipe.components)
    with pytest.raises(TypeError, match="CAT does not support PixArtSigmaPAGPipeline: perturbed"):
        apply_cat(pag, CFG)
    assert instance_state(pipe) == before
    processors = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor(AttnProcessor())
    with pytest.raises(TypeError, match=r"set_attn_processor\(AttnProcessor2_0\(\)\)"):
        apply_cat(pipe, CFG)
    assert get_patch(pipe) is None
    pipe.transformer.set_attn_processor(dict(processors))
    apply_cat(pipe, CFG)
    with pytest.raises(ValueError, match="num_clusters=300 exceeds the 256 image tokens"):
        generate(pipe) if apply_cat(pipe, CFG.replace(num_clusters=300)) else None
    state = get_patch(pipe).state
    assert not state.schedule.in_run and state.cache_bytes() == 0


# ---- the generate command on a saved folder ---------------------------------------------------
def test_generate_command_takes_a_pixart_sigma_folder(tmp_path, capsys):
    """`catpatch generate --model FOLDER` with a saved PixArt-Σ pipeline: images, CAT figures
    in the manifest (the pipeline bins 128x128 to its 256x256 bin: L = (256/4/2)² tokens)."""
    import json

    from catpatch.cli import main

    pixart().save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = main([
        "generate", "--model", str(tmp_path / "model"), "--prompt", "a red circle",
        "--size", "128x128", "--steps", "6", "--warmup-steps", "2", "--num-clusters", "4",
        "--out", str(out), "--device", "cpu", "--selection", "cat",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert (out / record["file"]).is_file()
    assert record["cat"] | {"steps": 6, "pruned_steps": 4, "L": 1024, "T": 300} == record["cat"]
