"""The scenes model's data, architecture and training machinery (weights-free parts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from catpatch.calibration import CALIBRATION_FILE
from catpatch.scenes import MODEL, data
from catpatch.trained import builtin_models
from catpatch.trained import train as toy_train


def test_registry_names_both_shipped_models():
    models = builtin_models()
    assert set(models) == {"toy", "scenes"}
    assert models["scenes"] is MODEL and models["toy"].name == "toy"


def test_scene_geometry_is_in_sd3_medium_regime():
    """576 image tokens (24 x 24) and T = 48 text tokens: T/L 0.083 against SD3-medium 1024²'s
    333/4096 = 0.081."""
    from catpatch.scenes import build

    cfg = build.TRANSFORMER_CONFIG
    side = data.IMAGE_SIZE // 2 ** (build.VAE_BLOCKS - 1) // cfg["patch_size"]
    assert side * side == 576
    assert MODEL.text_tokens == 48
    assert abs(MODEL.text_tokens / side**2 - 333 / 4096) < 0.01
    assert MODEL.call_kwargs["max_sequence_length"] == build.T5_LENGTH == 24


def test_scenes_are_seeded_and_captioned():
    a, la = data.make_batch(6, np.random.default_rng(3))
    b, lb = data.make_batch(6, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape == (6, 3, 96, 96) and 0 <= a.min() <= a.max() <= 1
    captions = {data.caption(lab) for lab in data.all_labels()}
    assert len(captions) == len(data.all_labels()) == 512  # every label set says itself
    assert max(len(c.split()) for c in captions) <= 20


def test_scenes_mix_flat_and_detailed_regions():
    """What makes the scenes a testbed for token policies: most of the image is flat (sky,
    ground), a minority holds fine detail (objects)."""
    images, labels = data.make_batch(32, np.random.default_rng(0))
    # Local detail: mean absolute difference to the right and lower neighbour, per 4x4 patch.
    dx = np.abs(np.diff(images, axis=3))[:, :, :-1, :]
    dy = np.abs(np.diff(images, axis=2))[:, :, :, :-1]
    detail = (dx + dy).sum(1)
    patches = detail[:, :92, :92].reshape(32, 23, 4, 23, 4).mean((2, 4))
    flat = (patches < 0.03).mean()  # smooth gradients only
    busy = (patches > 0.1).mean()
    assert flat > 0.75 and 0.05 < busy < 0.3


def test_captions_fit_the_scenes_text_length():
    from catpatch.scenes import build

    text = build.text_components()
    longest = max((data.caption(lab) for lab in data.all_labels()), key=len)
    assert len(text["tokenizer_3"](longest).input_ids) <= data.MAX_SEQUENCE_LENGTH
    for name in ("tokenizer", "tokenizer_2"):
        tok = text[name]
        assert all(len(tok(w).input_ids) == 3 for w in data.WORDS)  # bos, word, eos
        assert len(tok(longest).input_ids) <= tok.model_max_length == data.CLIP_LENGTH


def test_detector_heads_follow_the_dataset():
    from catpatch.trained.detector import Detector, accuracy

    det = Detector(data.ATTRIBUTES)
    logits = det(torch.rand(2, 3, 96, 96))
    assert [lg.shape[1] for lg in logits] == [len(v) for v in data.ATTRIBUTES.values()]
    labels = np.array([[0, 1, 2, 3, 1]])
    acc = accuracy(labels, labels, data)
    assert acc["left+right"] == acc["all"] == 1.0
    assert accuracy(np.array([[0, 1, 2, 0, 1]]), labels, data)["left+right"] == 0.0


def test_transformer_training_resumes_exactly(tmp_path):
    """A run stopped after a checkpoint and started again ends with the same weights as an
    uninterrupted run: model, EMA, optimizer, schedule and sampling RNG are all restored."""
    cfg = toy_train.TrainConfig(steps=4, batch=2, warmup=2, log_every=1, checkpoint_every=2)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 16, 32, 32, generator=gen)
    keys = np.arange(6) % 3
    text = (torch.randn(3, 32, 64, generator=gen), torch.randn(3, 64, generator=gen))
    empty = (torch.zeros(32, 64), torch.zeros(64))
    args = (latents, keys, text, empty, cfg)
    whole = toy_train.train_transformer(*args, lambda m: None)

    class Stop(Exception):
        pass

    def stop_at_three(msg: str) -> None:
        if msg.startswith("transformer step 3/"):
            raise Stop

    ckpt = tmp_path / "transformer.pt"
    with pytest.raises(Stop):
        toy_train.train_transformer(*args, stop_at_three, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    seen = []
    resumed = toy_train.train_transformer(*args, seen.append, checkpoint=ckpt)
    assert seen[0] == "resumed transformer training at step 2/4"
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_refuses_a_changed_config(tmp_path):
    work = tmp_path / ".train"
    work.mkdir()
    cfg = toy_train.TrainConfig(steps=3)
    (work / "config.json").write_text(
        __import__("json").dumps(dataclasses.asdict(dataclasses.replace(cfg, steps=5)))
    )
    with pytest.raises(ValueError, match="another TrainConfig"):
        toy_train.train(tmp_path, cfg)


# ---- the shipped weights ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    return MODEL.load_pipeline()


def test_shipped_scenes_weights_are_compact_safetensors():
    files = [p for p in MODEL.weights_dir().rglob("*") if p.is_file()]
    assert (MODEL.weights_dir() / "model_index.json").is_file()
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    # five pipeline components, the detector and the planner's calibration
    assert len(weights) == 7 and all(p.suffix == ".safetensors" for p in weights)
    assert any(p.name == CALIBRATION_FILE for p in weights)


def test_shipped_scenes_pipeline_follows_its_captions(shipped):
    """Measured on 64 generated images at training's end: sky 1.000, ground 0.953, left 0.922,
    right 0.906, sun 0.969, both objects 0.828 (chance: 1/4, 1/4, 1/4, 1/4, 1/2, 1/16)."""
    cfg = shipped.transformer.config
    assert (MODEL.height // shipped.vae_scale_factor // cfg.patch_size) ** 2 == 576
    assert shipped.vae.config.scaling_factor != 1.0  # trained latent statistics
    acc = MODEL.check(shipped, n=8)
    assert acc["sky"] >= 0.75 and acc["ground"] >= 0.6, acc
    assert acc["left+right"] >= 0.5, acc


def test_shipped_scenes_detector_reads_procedural_images():
    acc = MODEL.reference_accuracy(n=128)
    assert acc["all"] >= 0.95, acc
