"""The shipped toy SD3 pipeline: loads offline, follows its captions, and its parts hold up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catpatch import toy
from catpatch.calibration import CALIBRATION_FILE
from catpatch.toy import build, data
from catpatch.trained.detector import accuracy


@pytest.fixture(scope="module")
def pipe():
    return toy.load_pipeline()


@pytest.fixture(scope="module")
def detector():
    return toy.load_detector()


def test_shipped_pipeline_is_a_complete_sd3_pipeline(pipe):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert pipe.transformer.dtype == torch.float32
    cfg = pipe.transformer.config
    assert cfg.num_layers >= 6
    latent = toy.HEIGHT // pipe.vae_scale_factor
    assert (latent // cfg.patch_size) ** 2 >= 256
    assert cfg.in_channels == pipe.vae.config.latent_channels == 16
    # Trained latent statistics, not the constructor defaults.
    assert pipe.vae.config.scaling_factor != 1.0 and pipe.vae.config.shift_factor != 0.0
    # Default calls produce the recommended image size.
    assert pipe.default_sample_size * pipe.vae_scale_factor == toy.HEIGHT


def test_weights_are_compact_safetensors():
    files = [p for p in toy.weights_dir().rglob("*") if p.is_file()]
    assert (toy.weights_dir() / "model_index.json").is_file()
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    # five pipeline components, the detector and the planner's calibration
    assert len(weights) == 7 and all(p.suffix == ".safetensors" for p in weights)
    assert any(p.name == CALIBRATION_FILE for p in weights)


def test_generates_offline_at_few_steps(pipe):
    prompts = toy.eval_prompts(2)
    images = toy.generate(pipe, prompts, num_inference_steps=4)
    assert images.shape == (2, toy.HEIGHT, toy.WIDTH, 3)
    assert np.isfinite(images).all() and images.std() > 0.05
    # Each image comes from its own seed, whatever the batch.
    alone = toy.generate(pipe, prompts[1:], num_inference_steps=4)
    np.testing.assert_allclose(alone[0], images[1], atol=2e-3)


def test_generated_images_follow_their_captions(pipe, detector):
    # Chance: colour 1/6, texture 1/4, background colour 1/5, position 1/9.
    acc = toy.check(pipe, n=16, detector=detector, num_inference_steps=8)
    assert acc["colour"] >= 0.5
    assert acc["texture"] >= 0.4
    assert acc["background"] >= 0.4
    assert acc["position"] >= 0.18


def test_detector_reads_procedural_images(detector):
    acc = toy.reference_accuracy(detector, n=256)
    assert acc["colour"] >= 0.97
    assert acc["position"] >= 0.97
    assert acc["all"] >= 0.8


def test_detector_is_not_fooled_by_a_wrong_caption(detector):
    images, labels = data.make_batch(64, np.random.default_rng(7))
    predicted = detector.predict(images.transpose(0, 2, 3, 1))
    shuffled = np.roll(labels, 1, axis=0)
    assert accuracy(predicted, labels, data)["colour+position"] > 0.9
    assert accuracy(predicted, shuffled, data)["colour+position"] < 0.2


def test_eval_prompts_are_fixed():
    cases = toy.eval_prompts(64)
    assert len(cases) == 64 and len({(c.prompt, c.seed) for c in cases}) == 64
    assert toy.eval_prompts(8) == cases[:8]
    assert all(c.prompt == data.caption(c.labels) for c in cases)
    assert len({c.labels.colour for c in cases}) == len(data.COLOURS)
    assert len({c.labels.position for c in cases}) == len(data.POSITIONS)


def test_caption_words_are_single_tokens(pipe):
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        assert all(len(tok(w).input_ids) == 3 for w in data.WORDS)  # bos, word, eos
        longest = max((data.caption(lab) for lab in data.all_labels()), key=len)
        assert len(tok(longest).input_ids) <= tok.model_max_length


def test_captions_fit_the_toy_text_length(pipe):
    """Every caption fits the 16 T5 tokens the toy was trained on (nothing truncated), and the
    recommended call gives the transformer T = 32 text tokens (16 CLIP + 16 T5)."""
    t5 = pipe.tokenizer_3
    longest = max((data.caption(lab) for lab in data.all_labels()), key=len)
    assert len(t5(longest).input_ids) <= toy.MAX_SEQUENCE_LENGTH
    prompts = [p.prompt for p in toy.eval_prompts(2)]
    embeds, _, _, _ = pipe.encode_prompt(
        prompts, prompts, prompts, do_classifier_free_guidance=False,
        max_sequence_length=toy.CALL_KWARGS["max_sequence_length"],
    )  # fmt: skip
    assert embeds.shape[1] == toy.TEXT_TOKENS == build.CLIP_LENGTH + build.T5_LENGTH == 32


def test_procedural_data_is_seeded_and_labelled():
    a, la = data.make_batch(4, np.random.default_rng(3))
    b, lb = data.make_batch(4, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape == (4, 3, data.IMAGE_SIZE, data.IMAGE_SIZE) and 0 <= a.min() <= a.max() <= 1
    assert (la[:, 1] != la[:, 5]).all()  # shape and background colours differ
    # The shape is drawn in its colour: the image holds pixels of exactly that colour.
    for img, lab in zip(a, la, strict=True):
        rgb = data._RGB[lab[1]][:, None, None]
        assert (np.abs(img - rgb).max(axis=0) < 1e-3).sum() > 20


def test_cli_sample_and_check(tmp_path, capsys):
    from catpatch.trained.cli import main

    main(["sample", "--out", str(tmp_path), "--n", "2", "--steps", "2"])
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "001.png").is_file()
    main(["check", "--n", "2", "--steps", "2"])
    out = capsys.readouterr().out
    assert "detector on procedural images" in out and "detector on 2 generated images" in out
