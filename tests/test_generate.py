"""`catpatch generate`: offline runs of a saved tiny pipeline, resume, two processes, errors."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catpatch.cli.generate import (
    MANIFEST,
    GenerateError,
    GenerateSettings,
    add_parser,
    main,
    read_prompts,
    run,
)
from catpatch.cli.generate.manifest import read_records
from catpatch.cli.generate.pipeline import _cat_config

# CAT's figures are what these tests read (the default policy has its own test file)
FAST = dict(size=(64, 64), steps=6, warmup_steps=2, num_clusters=4, progress=False, selection="cat")
PROMPTS = ["a red circle", "a small blue square on a tree"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from catpatch.models.tiny import build_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd3")
    build_pipeline("tiny-sd3").save_pretrained(folder)
    return str(folder)


def settings(model: str, out: Path, **changes) -> GenerateSettings:
    prompts = changes.pop("prompts", PROMPTS)
    return GenerateSettings(model=model, prompts=prompts, out=out, **{**FAST, **changes})


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))}


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def test_cat_and_baseline_pair_up_by_name(model_dir, tmp_path):
    from catpatch.cli.evaluate import evaluate

    cat = run(settings(model_dir, tmp_path / "cat", images_per_prompt=2, batch_size=3))
    assert (cat.generated, cat.skipped, cat.missing) == (4, 0, [])
    records = manifest(tmp_path / "cat")
    names = ["00000_000.png", "00000_001.png", "00001_000.png", "00001_001.png"]
    assert [r["file"] for r in records] == names
    assert [r["seed"] for r in records] == [0, 1, 1000, 1001]
    assert [r["prompt"] for r in records] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert [(r["prompt_index"], r["image_index"]) for r in records] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    first = records[0]
    assert first["settings"]["model"] == str(Path(model_dir).resolve())
    assert first["settings"] | {"keep_ratio": 0.3, "height": 64, "steps": 6} == first["settings"]
    assert first["time_s"] > 0 and first["batch_images"] == 3 and records[3]["batch_images"] == 1
    # CAT really ran: 6 steps, 2 warm-up, S = floor(0.3 * 64) of L = (64 / 8)^2 tokens
    assert first["cat"] | {"steps": 6, "pruned_steps": 4, "S": 19, "L": 64} == first["cat"]
    assert 0 < first["cat"]["computed_fraction"] < 1 and 0 < first["cat"]["macs_ratio"] < 1
    assert not list((tmp_path / "cat").glob("manifest.rank*")), "shards are merged away"

    base = run(settings(model_dir, tmp_path / "base", images_per_prompt=2, cat=False))
    assert base.generated == 4 and all(r["cat"] is None for r in manifest(tmp_path / "base"))
    cat_px, base_px = pixels(tmp_path / "cat"), pixels(tmp_path / "base")
    assert list(cat_px) == list(base_px) == names
    assert all(np.abs(cat_px[n] - base_px[n]).max() > 0 for n in names), "CAT changed nothing"
    assert np.abs(cat_px[names[0]] - cat_px[names[1]]).max() > 0, "seeds must differ per image"

    run(settings(model_dir, tmp_path / "again", images_per_prompt=2, batch_size=3))
    again = pixels(tmp_path / "again")
    assert all(np.array_equal(again[n], cat_px[n]) for n in names), "not deterministic"

    result = evaluate(tmp_path / "base", tmp_path / "cat")
    assert result.counts == {"pairs": 4, "identical": 0, "only_reference": 0, "only_candidate": 0}
    assert 0 < result.summary["ssim"]["max"] < 1 and np.isfinite(result.summary["psnr"]["max"])
    assert result.runs["candidate"]["cat"]["pruned_steps"] == 4
    assert result.runs["reference"]["cat"] is None


def test_resume_makes_only_missing_images(model_dir, tmp_path):
    out = tmp_path / "run"
    prompts = ["a red circle", "a blue square", "a green cross"]
    job = settings(model_dir, out, prompts=prompts, images_per_prompt=2)
    every = [f"{i:05d}_{j:03d}.png" for i in range(3) for j in range(2)]

    class Killed(Exception):
        pass

    made: list[str] = []

    def kill_after_three(record):
        made.append(record["file"])
        if len(made) == 3:
            raise Killed

    with pytest.raises(Killed):
        run(job, on_image=kill_after_three)
    assert sorted(p.name for p in out.glob("*.png")) == made == every[:3]
    shard = out / "manifest.rank0.jsonl"
    assert not (out / MANIFEST).exists() and len(shard.read_text().splitlines()) == 3
    # What else a crash leaves: a lost PNG (its line stays), a torn last line, a temp file.
    (out / made[0]).unlink()
    with open(shard, "a") as f:
        f.write('{"file": "00001_001.png", "pro')
    (out / ".00001_001.png.99.tmp").write_bytes(b"partial")

    remade: list[str] = []
    result = run(job, on_image=lambda record: remade.append(record["file"]))
    assert sorted(remade) == [every[0], *every[3:]], "only the missing images are made"
    assert (result.skipped, result.generated, result.missing) == (2, 4, [])
    records = manifest(out)
    assert [r["file"] for r in records] == every, "one line per image, in order, no duplicates"
    assert sorted(p.name for p in out.glob("*.png")) == every
    assert not list(out.glob("manifest.rank*")) and not list(out.glob(".*.tmp"))

    uninterrupted = tmp_path / "whole"
    run(settings(model_dir, uninterrupted, prompts=prompts, images_per_prompt=2))
    resumed, whole = pixels(out), pixels(uninterrupted)
    assert all(np.array_equal(resumed[n], whole[n]) for n in every)

    def never(record):
        raise AssertionError(f"{record['file']} made again")

    again = run(job, on_image=never)
    assert (again.skipped, again.generated) == (6, 0) and len(manifest(out)) == 6


def test_resume_after_a_crash_between_a_png_and_its_line(model_dir, tmp_path, monkeypatch):
    """The narrowest crash window: the PNG is on disk, its manifest line is not. The re-run
    must make that image again (a PNG without a line is not done) and record it once."""
    from catpatch.cli.generate import loop

    out = tmp_path / "run"
    prompts = ["a red circle", "a blue square"]
    job = settings(model_dir, out, prompts=prompts, images_per_prompt=2)
    every = [f"{i:05d}_{j:03d}.png" for i in range(2) for j in range(2)]

    class Killed(Exception):
        pass

    append, lines = loop._append, []

    def append_until_third(path, record):
        if len(lines) == 2:
            raise Killed  # the third PNG is written, its line never is
        lines.append(record["file"])
        append(path, record)

    monkeypatch.setattr(loop, "_append", append_until_third)
    with pytest.raises(Killed):
        run(job)
    monkeypatch.setattr(loop, "_append", append)
    assert sorted(p.name for p in out.glob("*.png")) == every[:3] and lines == every[:2]

    remade: list[str] = []
    result = run(job, on_image=lambda record: remade.append(record["file"]))
    assert remade == every[2:], "the PNG without a manifest line must be made again"
    assert (result.skipped, result.generated, result.missing) == (2, 2, [])
    assert [r["file"] for r in manifest(out)] == every
    whole = tmp_path / "whole"
    run(settings(model_dir, whole, prompts=prompts, images_per_prompt=2))
    resumed, reference = pixels(out), pixels(whole)
    assert all(np.array_equal(resumed[n], reference[n]) for n in every)


# The `catpatch generate` command line, stopped for good once its second PNG is on disk (and
# before that image's manifest line): it says so on stdout, then waits on stdin, which the
# test never writes (EOF, should the test itself die, lets it finish instead of linger).
_STOP_AT_SECOND_PNG = """
import sys
from catpatch.cli import main
from catpatch.cli.generate import loop

save, saved = loop._save_png, []

def save_then_stop(image, path):
    save(image, path)
    saved.append(path.name)
    if len(saved) == 2:
        print("stopped after", path.name, flush=True)
        sys.stdin.read()

loop._save_png = save_then_stop
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill(model_dir, tmp_path, capsys):
    """`catpatch generate` killed with SIGKILL (no Python cleanup, no exception handler) mid-run,
    with one image recorded and the next one's PNG on disk without its manifest line, then the
    same command again: every image exactly once in the manifest, no shard or temp file left,
    pixels equal to an uninterrupted run's. The child stops at that point and says so on its
    stdout; the test kills it once it has read that line (no clock, no race with the run)."""
    from catpatch.cli import main as catpatch_main

    prompts = ["a red circle", "a blue square", "a green cross"]
    out = tmp_path / "killed"
    args = ["generate", "--model", model_dir]
    for prompt in prompts:
        args += ["--prompt", prompt]
    args += [
        "--images-per-prompt", "2", "--out", str(out), "--size", "64x64", "--steps", "12",
        "--warmup-steps", "2", "--num-clusters", "4", "--device", "cpu", "--no-progress",
        "--selection", "cat",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    every = [f"{i:05d}_{j:03d}.png" for i in range(3) for j in range(2)]

    command = [sys.executable, "-c", _STOP_AT_SECOND_PNG, *args]
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    child = []
    try:
        for line in process.stdout:  # until the child stops at its second PNG, or ends
            child.append(line)
            if line.startswith("stopped after"):
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        process.kill()
        child.append(process.communicate()[0])
    output = "".join(child)
    assert process.returncode == -signal.SIGKILL, f"not killed mid-run: {output[-2000:]!r}"
    assert sorted(p.name for p in out.glob("*.png")) == every[:2]
    assert not (out / MANIFEST).exists(), "a killed run cannot have merged its manifest"
    # the second PNG has no line: only recorded images count as done
    recorded = [f for f in read_records(out) if (out / f).is_file()]
    assert recorded == every[:1], recorded

    capsys.readouterr()
    assert catpatch_main(args) == 0  # the same command again (in this process: faster)
    printed, k = capsys.readouterr().out, len(recorded)
    assert f"6 of 6 images in {out} ({k} already there, {6 - k} made" in printed, printed
    records = manifest(out)
    assert [r["file"] for r in records] == every, "each image exactly once, in order"
    assert sorted(p.name for p in out.glob("*.png")) == every
    assert not list(out.glob("manifest.rank*")) and not list(out.glob(".*.tmp"))

    whole = tmp_path / "whole"
    run(settings(model_dir, whole, prompts=prompts, images_per_prompt=2, steps=12, device="cpu"))
    resumed, reference = pixels(out), pixels(whole)
    assert all(np.array_equal(resumed[n], reference[n]) for n in every), "resumed != whole"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_work(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a red circle number {i}\n\n" for i in range(6)))
    out = tmp_path / "dp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master-port", str(free_port()), "-m", "catpatch.cli.generate", "--model", model_dir,
        "--prompts-file", str(prompts), "--out", str(out), "--size", "64x64", "--steps", "6",
        "--warmup-steps", "2", "--num-clusters", "4", "--device", "cpu", "--no-progress",
        "--selection", "cat",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    every = [f"{i:05d}_000.png" for i in range(6)]
    assert sorted(p.name for p in out.glob("*.png")) == every
    records = manifest(out)
    assert [r["file"] for r in records] == every, "6 unique lines, merged in order"
    assert [r["rank"] for r in records] == [0, 0, 0, 1, 1, 1], "both processes did their share"
    assert {r["settings"]["world_size"] for r in records} == {2}
    assert all(r["cat"]["pruned_steps"] == 4 for r in records)
    assert not list(out.glob("manifest.rank*"))
    assert "6 of 6 images" in done.stdout


def test_lora_is_loaded_and_scaled(model_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from catpatch.models.tiny import build_pipeline

    transformer = build_pipeline("tiny-sd3").transformer
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    lora = tmp_path / "lora"
    layers = get_peft_model_state_dict(transformer)
    StableDiffusion3Pipeline.save_lora_weights(lora, transformer_lora_layers=layers)

    one = settings(model_dir, tmp_path / "plain", prompts=PROMPTS[:1])
    run(one)
    for scale in (0.0, 1.0):
        out = tmp_path / f"lora{scale}"
        run(settings(model_dir, out, prompts=PROMPTS[:1], lora=str(lora), lora_scale=scale))
        assert manifest(out)[0]["settings"]["lora_scale"] == scale
    plain = pixels(tmp_path / "plain")["00000_000.png"]
    assert np.array_equal(pixels(tmp_path / "lora0.0")["00000_000.png"], plain)
    assert np.abs(pixels(tmp_path / "lora1.0")["00000_000.png"] - plain).max() > 0


def test_user_errors_name_the_fix(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(GenerateError, match="model folder .* does not exist"):
        run(settings(str(tmp_path / "nope"), out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenerateError, match="no model_index.json"):
        run(settings(str(tmp_path / "empty"), out))
    for size, message in [
        ((60, 64), "multiples of 8 .*e.g. --size 64x64"),
        ((1024, 1024), "at most 768 pixels"),
    ]:
        with pytest.raises(GenerateError, match=message):
            run(settings(model_dir, out, size=size))
    with pytest.raises(GenerateError, match="--num-clusters 100 exceeds the 64 image tokens"):
        run(settings(model_dir, out, num_clusters=100))
    with pytest.raises(GenerateError, match=r"--keep-ratio 1.5: must be in \(0, 1\]"):
        run(settings(model_dir, out, keep_ratio=1.5))
    with pytest.raises(GenerateError, match="prompts file .* does not exist"):
        read_prompts(tmp_path / "missing.txt")

    # A resumed run must ask for what the folder holds.
    run(settings(model_dir, out, prompts=PROMPTS[:1]))
    with pytest.raises(GenerateError, match="keep_ratio=0.3, this run asks for 0.5"):
        run(settings(model_dir, out, prompts=PROMPTS[:1], keep_ratio=0.5))
    with pytest.raises(GenerateError, match="prompt='a red circle'"):
        run(settings(model_dir, out, prompts=["a blue square"]))

    from diffusers import StableDiffusion3Pipeline

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(StableDiffusion3Pipeline, "__call__", out_of_memory)
    with pytest.raises(GenerateError, match="out of memory at --batch-size 2, 64x64: lower"):
        run(settings(model_dir, tmp_path / "oom", batch_size=2))


def test_not_sd3_pipeline_and_cli_message(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    for extra in ([], ["--no-cat"]):
        args = ["--model", str(tmp_path / "ddpm"), "--prompt", "a cat", "--out", str(tmp_path)]
        assert main(args + extra) == 2
        err = capsys.readouterr().err  # after diffusers' loading bar
        last = err.strip().splitlines()[-1]
        assert last.startswith("catpatch generate: error: DDPMPipeline is not a supported SD3")
        assert "Traceback" not in err

    out = str(tmp_path / "x")
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "a", "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "a failed run left its --out folder behind"
    with pytest.raises(SystemExit):
        main(["--model", "m", "--prompt", "a", "--out", out, "--size", "big"])
    assert "size must look like 1024x1024" in capsys.readouterr().err


def test_parser_prompt_files_and_compile_flag(tmp_path):
    parser = argparse.ArgumentParser(prog="catpatch")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["generate", "--model", "m", "--prompts-file", "p.txt", "--out", "o", "--no-cat",
         "--size", "512x768", "--batch-size", "4", "--compile"]
    )  # fmt: skip
    assert (args.cat, args.size, args.batch_size, args.compile) == (False, (512, 768), 4, True)
    assert args.func.__name__ == "command"
    assert _cat_config(settings("m", tmp_path, compile=True)).compile == "default"

    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n"b"\n{"caption": "c"}\n')
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\nan owl\tAnimals\na car\tVehicles\n")
    (tmp_path / "coco.json").write_text('{"annotations": [{"image_id": 1, "caption": "a dog"}]}')
    assert read_prompts(tmp_path / "p.txt") == ["a red circle", "a blue square"]
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b", "c"]
    assert read_prompts(tmp_path / "parti.tsv", limit=1) == ["an owl"]
    assert read_prompts(tmp_path / "coco.json") == ["a dog"]
    (tmp_path / "bad.csv").write_text("id,category\n1,x\n")
    with pytest.raises(GenerateError, match="no prompt/caption/text field"):
        read_prompts(tmp_path / "bad.csv")


def test_flux_pipeline_folder(tmp_path):
    """`--model` takes a saved FLUX pipeline folder: CAT applies, and the images and figures
    come out as for SD3."""
    from catpatch.models.tiny import build_pipeline

    folder = tmp_path / "tiny-flux"
    build_pipeline("tiny-flux").save_pretrained(folder)
    out = tmp_path / "out"
    run(settings(str(folder), out, prompts=PROMPTS[:1], size=(64, 64)))
    records = manifest(out)
    assert len(records) == 1 and (out / records[0]["file"]).is_file()
    assert records[0]["cat"]["pruned_steps"] == 4, records[0]
    # tiny VAE: scale 4, then 2x2 latents per token -> multiples of 8
    with pytest.raises(GenerateError, match="multiples of 8"):
        run(settings(str(folder), tmp_path / "bad", size=(60, 60)))
