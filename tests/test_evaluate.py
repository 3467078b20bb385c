"""`catpatch eval`: PSNR/SSIM/CLIP of two `generate` folders, paired by manifest file name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catpatch.cli.evaluate import EvalError, evaluate, main
from catpatch.cli.generate import MANIFEST

PROMPTS = ["a red circle", "a blue square on a tree", "a green cross at night"]


def write_run(folder: Path, images: list[np.ndarray], prompts=PROMPTS, cat=None, times=None,
              settings=None) -> Path:  # fmt: skip
    """A folder as `catpatch generate` leaves it: PNGs and their manifest lines; the first
    image is the cold one (`warm` false)."""
    folder.mkdir(parents=True)
    times = times or [0.5] * len(images)
    with open(folder / MANIFEST, "w") as f:
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            name = f"{i:05d}_000.png"
            Image.fromarray(image).save(folder / name)
            record = {"file": name, "prompt": prompt, "prompt_index": i, "image_index": 0,
                      "seed": 1000 * i, "time_s": times[i], "warm": i > 0,
                      "settings": {"cat": cat is not None, **(settings or {})},
                      "cat": cat}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return folder


def images(seed: int, noise: float = 0.0, n: int = 3) -> list[np.ndarray]:
    """Smooth test pictures, optionally with Gaussian noise of `noise` grey levels."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:64, 0:64] / 64
    out = []
    for i in range(n):
        base = np.stack([np.sin(6 * xs + i), np.cos(5 * ys - i), xs * ys], -1) * 100 + 120
        out.append(np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8))
    return out


def test_identical_and_different_folders(tmp_path):
    ref = write_run(tmp_path / "ref", images(0))
    same = evaluate(ref, ref)
    assert same.counts["identical"] == same.counts["pairs"] == 3
    assert all(row["psnr"] == float("inf") for row in same.images)
    assert same.summary["ssim"]["min"] == pytest.approx(1.0, abs=1e-6)
    assert same.to_dict()["images"][0]["psnr"] is None, "JSON holds no Infinity"
    json.dumps(same.to_dict(), allow_nan=False)

    cat = {"steps": 28, "pruned_steps": 20, "S": 19, "L": 64, "macs_ratio": 0.5,
           "computed_fraction": 0.4}  # fmt: skip
    near = write_run(tmp_path / "near", images(0, noise=3), cat=cat)
    far = write_run(tmp_path / "far", images(0, noise=20))
    a, b = evaluate(ref, near), evaluate(ref, far)
    assert a.counts["identical"] == 0
    for row, name in zip(a.images, sorted(p.name for p in ref.glob("*.png")), strict=True):
        r = np.asarray(Image.open(ref / name), dtype=float) / 255
        c = np.asarray(Image.open(near / name), dtype=float) / 255
        assert row["file"] == name
        assert row["psnr"] == pytest.approx(10 * np.log10(1 / np.mean((r - c) ** 2)), rel=1e-4)
    assert 25 < a.summary["psnr"]["mean"] < 60 and a.summary["ssim"]["max"] < 1
    assert b.summary["psnr"]["max"] < a.summary["psnr"]["min"]
    assert b.summary["ssim"]["max"] < a.summary["ssim"]["min"]
    assert a.runs["candidate"]["cat"]["macs_ratio"] == 0.5 and a.runs["reference"]["cat"] is None
    assert "MACs ratio 0.500" in a.table() and "PSNR (dB)" in a.table()


def test_pairing_by_manifest(tmp_path):
    ref = write_run(tmp_path / "ref", images(0))
    fewer = write_run(tmp_path / "fewer", images(0, noise=5, n=2), prompts=PROMPTS[:2])
    (fewer / "99999_000.png").write_bytes((ref / "00000_000.png").read_bytes())  # unrecorded
    result = evaluate(ref, fewer)
    assert result.counts == {"pairs": 2, "identical": 0, "only_reference": 1, "only_candidate": 0}
    assert [row["prompt"] for row in result.images] == PROMPTS[:2]

    other = write_run(tmp_path / "other", images(0), prompts=["x", "y", "z"])
    with pytest.raises(EvalError, match="made from prompt 'a red circle' in the reference"):
        evaluate(ref, other)
    (tmp_path / "bare").mkdir()
    with pytest.raises(EvalError, match="no manifest.jsonl with images"):
        evaluate(ref, tmp_path / "bare")
    with pytest.raises(EvalError, match="--candidate .*: no such folder"):
        evaluate(ref, tmp_path / "nowhere")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP model + processor, saved offline; its pooled features are biased
    so prompt-image cosines are positive (CLIP scores are clamped at 0)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from catpatch.models.tiny import clip_tokenizer

    tok = clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        model.vision_model.post_layernorm.bias.fill_(1.0)
        model.text_model.final_layer_norm.bias.fill_(1.0)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    crop = {"height": 32, "width": 32}
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop)
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(folder)
    return folder


def reference_clip_score(folder: Path, image: np.ndarray, prompt: str) -> float:
    """max(100 cos, 0) computed with transformers directly."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    pixels = torch.from_numpy(image).permute(2, 0, 1)
    inputs = processor(text=[prompt], images=[pixels], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    return max(100 * float(torch.cosine_similarity(img, txt).item()), 0.0)


def test_clip_score_and_cli_json(tmp_path, clip_dir, capsys):
    ref = write_run(tmp_path / "ref", images(0))
    cand = write_run(tmp_path / "cand", images(1, noise=40))
    result = evaluate(ref, cand, clip_model=str(clip_dir))
    scores = []
    for i, row in enumerate(result.images):
        expected = reference_clip_score(clip_dir, images(0)[i], PROMPTS[i])
        assert row["clip_reference"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert row["clip_delta"] == pytest.approx(row["clip_candidate"] - row["clip_reference"])
        scores.append(row["clip_reference"])
    assert min(scores) > 0 and len(set(scores)) == 3, "the score depends on prompt and image"
    assert result.summary["clip_candidate"]["n"] == 3

    out = tmp_path / "eval" / "result.json"
    args = ["--reference", str(ref), "--candidate", str(cand), "--clip-model", str(clip_dir)]
    assert main(args + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CLIP reference" in printed and "SSIM" in printed
    saved = json.loads(out.read_text())
    assert saved["counts"]["pairs"] == 3 and len(saved["images"]) == 3
    assert saved["summary"]["clip_reference"]["mean"] == pytest.approx(np.mean(scores))

    assert main(["--reference", str(ref), "--candidate", str(cand), "--clip-model", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("catpatch eval: error: --clip-model nope: cannot load")


def test_lpips_needs_torchvision(tmp_path):
    ref = write_run(tmp_path / "ref", images(0))
    cand = write_run(tmp_path / "cand", images(0, noise=10))
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(EvalError, match="--lpips needs torchvision"):
            evaluate(ref, cand, lpips=True)
        return
    try:  # torchvision present: LPIPS works, or names the weights it could not fetch
        result = evaluate(ref, cand, lpips=True)
    except EvalError as err:
        assert "--lpips needs" in str(err)
    else:
        assert all(row["lpips"] > 0 for row in result.images)


def test_time_per_image_counts_warm_images_only(tmp_path):
    """The first (cold) image of a run is not timed; runs on other settings are not compared."""
    ref = write_run(tmp_path / "ref", images(0), times=[61.0, 1.0, 1.0])
    cat = write_run(tmp_path / "cat", images(0, noise=3), times=[30.0, 0.8, 0.8])
    result = evaluate(ref, cat)
    assert result.runs["reference"]["time_s"] == 1.0 and result.runs["reference"]["timed"] == 2
    assert result.runs["candidate"]["time_s"] == pytest.approx(0.8)
    line = result.table().splitlines()[-1]
    assert "warm batches only: reference 1 s (2 images), candidate 0.8 s" in line
    assert "1.25x" in line and "61" not in line

    other = write_run(tmp_path / "gpu", images(0, noise=3), settings={"device": "cuda"})
    assert "not compared (the runs differ in device)" in evaluate(ref, other).table()
    one = write_run(tmp_path / "one", images(0)[:1], prompts=PROMPTS[:1])
    assert evaluate(one, one).runs["reference"]["time_s"] is None
    assert "time per image: not shown" in evaluate(one, one).table()
