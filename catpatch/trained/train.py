"""Train a shipped SD3 pipeline from scratch on its procedural data (`python -m catpatch.toy train`,
`python -m catpatch.scenes train`); the toy's recipe where none is given.

A `Recipe` names the model's data module (images, labels, captions) and build module
(architecture). Stages, all seeded: (1) the VAE on random images; (2) a fixed data set encoded
to latents, whose statistics set the VAE's `shift_factor` / `scaling_factor`; (3) the
transformer with the rectified-flow objective of SD3 on those latents and the frozen text
encoders' embeddings of the captions; (4) the label detector used by `check`. The pipeline is
saved with `save_pretrained` in float16, the detector beside it. Captions are encoded as the
pipeline encodes them at the model's `max_sequence_length`, so training sees the text sequence
sampling sees. A run is resumable: each stage's result and a transformer checkpoint every
`checkpoint_every` steps go to `OUT/.train/`; the same command picks up where it stopped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .detector import DETECTOR_FILE, train_detector
from .model import MODEL_FILE, Recipe, builtin_models

# The toy's T5 length and scheduler shift (`catpatch.toy.build`), the defaults of the helpers
# below; each model's training passes its own.
T5_LENGTH = 16
SCHEDULER_SHIFT = 3.0


def _recipe(recipe: Recipe | None) -> Recipe:
    """`recipe`, or the toy's when None."""
    return recipe if recipe is not None else builtin_models()["toy"].recipe


@dataclass
class TrainConfig:
    """Step counts and hyper-parameters of the full training run."""

    seed: int = 0
    vae_steps: int = 500
    vae_batch: int = 16
    vae_lr: float = 1.5e-3
    vae_kl: float = 1e-4
    dataset_size: int = 16000
    steps: int = 2000
    batch: int = 32
    lr: float = 8e-4
    warmup: int = 150
    ema: float = 0.996
    drop_text: float = 0.1
    detector_steps: int = 700
    log_every: int = 100
    # bfloat16 autocast for the transformer's forward (about 2x faster on CPUs with AVX512-BF16;
    # master weights, optimizer and EMA stay float32). The shipped toy was trained without.
    autocast: bool = False
    checkpoint_every: int = 250  # transformer steps between resumable checkpoints


def _log(msg: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)


def _images(data: ModuleType, rng: np.random.Generator, n: int) -> Tensor:
    return torch.from_numpy(data.make_batch(n, rng)[0]) * 2 - 1


# ---- VAE -------------------------------------------------------------------------------------
def train_vae(cfg: TrainConfig, log: Callable[[str], None], recipe: Recipe | None = None):
    """Train the `AutoencoderKL` (L1 + MSE reconstruction, small KL) on fresh random images."""
    recipe = _recipe(recipe)
    vae = recipe.build.vae_model(cfg.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.1
    )
    rng = np.random.default_rng(cfg.seed + 100)
    gen = torch.Generator().manual_seed(cfg.seed + 101)
    vae.train()
    for step in range(cfg.vae_steps):
        x = _images(recipe.data, rng, cfg.vae_batch)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + cfg.vae_kl * post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0:
            log(f"vae step {step + 1}/{cfg.vae_steps} rec {rec_loss.item():.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(
    vae, cfg: TrainConfig, recipe: Recipe | None = None
) -> tuple[Tensor, np.ndarray]:
    """Latent means (N, C, h, w) and labels (N, attributes) of a fixed random data set."""
    recipe = _recipe(recipe)
    rng = np.random.default_rng(cfg.seed + 200)
    latents, labels = [], []
    for start in range(0, cfg.dataset_size, 250):
        images, labs = recipe.data.make_batch(min(250, cfg.dataset_size - start), rng)
        latents.append(vae.encode(torch.from_numpy(images) * 2 - 1).latent_dist.mean)
        labels.append(labs)
    return torch.cat(latents), np.concatenate(labels)


# ---- text ------------------------------------------------------------------------------------
def label_key(labels: np.ndarray, data: ModuleType) -> np.ndarray:
    """A unique integer per label combination (mixed radix over `ATTRIBUTES`)."""
    key = np.zeros(len(labels), dtype=np.int64)
    for i, names in enumerate(data.ATTRIBUTES.values()):
        key = key * len(names) + labels[:, i]
    return key


@torch.no_grad()
def encode_captions(
    pipe, captions: list[str], chunk: int = 512, t5_length: int = T5_LENGTH
) -> tuple[Tensor, Tensor]:
    """Prompt embeddings (N, CLIP_LENGTH + T5_LENGTH, D) and pooled embeddings (N, P)."""
    embeds, pooled = [], []
    for i in range(0, len(captions), chunk):
        part = captions[i : i + chunk]
        pe, _, pp, _ = pipe.encode_prompt(
            part, part, part, do_classifier_free_guidance=False,
            max_sequence_length=t5_length,
        )  # fmt: skip
        embeds.append(pe)
        pooled.append(pp)
    return torch.cat(embeds), torch.cat(pooled)


# ---- transformer -----------------------------------------------------------------------------
def sample_sigmas(n: int, gen: torch.Generator, shift: float = SCHEDULER_SHIFT) -> Tensor:
    """Noise levels: logit-normal, then the scheduler's shift (as SD3's training scripts)."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    s = shift
    return s * u / (1 + (s - 1) * u)


def train_transformer(
    latents: Tensor,
    keys: np.ndarray,
    text: tuple[Tensor, Tensor],
    empty: tuple[Tensor, Tensor],
    cfg: TrainConfig,
    log: Callable[[str], None],
    recipe: Recipe | None = None,
    checkpoint: Path | None = None,
):
    """Rectified-flow training of the transformer; returns the EMA model. With `checkpoint`,
    the run state is saved there every `cfg.checkpoint_every` steps and resumed from it."""
    recipe = _recipe(recipe)
    embeds, pooled = text
    model = recipe.build.transformer_model(cfg.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed + 300)
    first = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        first = state["step"]
        log(f"resumed transformer training at step {first}/{cfg.steps}")
    running = 0.0
    for step in range(first, cfg.steps):
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx]
        rows = torch.from_numpy(keys[idx.numpy()])
        ctx, pool = embeds[rows], pooled[rows]
        drop = torch.rand(cfg.batch, generator=gen) < cfg.drop_text
        ctx = torch.where(drop[:, None, None], empty[0], ctx)
        pool = torch.where(drop[:, None], empty[1], pool)
        sigma = sample_sigmas(cfg.batch, gen, recipe.build.SCHEDULER_SHIFT)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast):
            pred = model(xt, ctx, pool, sigma * 1000).sample
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        running += loss.item()
        if (step + 1) % cfg.log_every == 0:
            log(f"transformer step {step + 1}/{cfg.steps} loss {running / cfg.log_every:.4f}")
            running = 0.0
        if checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0:
            state = dict(
                model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                sched=sched.state_dict(), gen=gen.get_state(), step=step + 1,
            )  # fmt: skip
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # atomic: a kill mid-save is safe
    return ema.eval()


# ---- the whole run ---------------------------------------------------------------------------
def _stage_vae(cfg: TrainConfig, log: Callable[[str], None], recipe: Recipe, work: Path):
    """The trained VAE with its latent statistics, and the encoded data set (saved to `work`
    and read back on a resumed run)."""
    from safetensors.torch import load_file, save_file

    vae_file, data_file = work / "vae.safetensors", work / "dataset.pt"
    if vae_file.exists() and data_file.exists():
        vae = recipe.build.vae_model(cfg.seed)
        vae.load_state_dict(load_file(str(vae_file)))
        vae.eval().requires_grad_(False)
        saved = torch.load(data_file, weights_only=False)
        vae.register_to_config(shift_factor=saved["shift"], scaling_factor=saved["scale"])
        log(f"resumed: VAE and {len(saved['latents'])} encoded images from {work}")
        return vae, saved["latents"], saved["labels"]
    vae = train_vae(cfg, log, recipe)
    latents, labels = encode_dataset(vae, cfg, recipe)
    shift = latents.mean().item()
    scale = 1.0 / (latents - shift).std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (latents - shift) * scale
    log(f"encoded {len(latents)} images: shift_factor {shift:.4f} scaling_factor {scale:.4f}")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_file))
    torch.save(dict(latents=latents, labels=labels, shift=shift, scale=scale), data_file)
    return vae, latents, labels


def train(out: str | Path, cfg: TrainConfig | None = None, recipe: Recipe | None = None):
    """Train everything and save the pipeline (float16 safetensors) and detector to `out`;
    resumes from `out/.train` when an earlier run with the same config stopped part way."""
    import json

    from safetensors.torch import save_file

    recipe = _recipe(recipe)
    cfg = cfg or TrainConfig()
    start = time.perf_counter()
    out = Path(out)
    work = out / ".train"
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()) != asdict(cfg):
        raise ValueError(
            f"{work} holds a run with another TrainConfig; resume with the same settings or "
            f"delete {work} to start over"
        )
    config_file.write_text(json.dumps(asdict(cfg)))

    def log(msg: str) -> None:
        _log(msg, start)

    torch.manual_seed(cfg.seed)
    build, data = recipe.build, recipe.data
    text = build.text_components(cfg.seed)
    vae, latents, labels = _stage_vae(cfg, log, recipe, work)

    pipe = build.assemble(build.transformer_model(cfg.seed), vae, text)
    combos = data.all_labels()
    captions = [data.caption(c) for c in combos]
    embeds, pooled = encode_captions(pipe, captions, t5_length=build.T5_LENGTH)
    table = np.full(math.prod(len(v) for v in data.ATTRIBUTES.values()), -1)
    table[label_key(np.array(combos), data)] = np.arange(len(combos))
    empty_embeds, empty_pooled = encode_captions(pipe, [""], t5_length=build.T5_LENGTH)
    log(f"encoded {len(combos)} captions to {tuple(embeds.shape[1:])} text tokens")

    transformer = train_transformer(
        latents,
        table[label_key(labels, data)],
        (embeds, pooled),
        (empty_embeds[0], empty_pooled[0]),
        cfg,
        log,
        recipe,
        checkpoint=work / "transformer.pt",
    )
    pipe = build.assemble(transformer, vae, text)
    detector = train_detector(cfg.detector_steps, cfg.seed + 400, log, dataset=data)

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence the float16 cast notes
    pipe.to(torch.float16).save_pretrained(out)
    pipe.to(torch.float32)
    diffusers_logging.set_verbosity(level)
    save_file(
        {k: v.half().contiguous() for k, v in detector.state_dict().items()},
        str(out / DETECTOR_FILE),
    )
    (out / MODEL_FILE).write_text(json.dumps({"data": data.__name__}))
    log(f"saved pipeline and detector to {out} (training state kept in {work})")
    return pipe, detector
