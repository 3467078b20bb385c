"""Train the toy SD3 pipeline from scratch on the procedural data (`python -m catpatch.toy train`).

Stages, all seeded: (1) the VAE on random images; (2) a fixed data set encoded to latents,
whose statistics set the VAE's `shift_factor` / `scaling_factor`; (3) the transformer with the
rectified-flow objective of SD3 on those latents and the frozen text encoders' embeddings of the
captions; (4) the shape detector used by `check`. The pipeline is saved with `save_pretrained`
in float16, the detector beside it. Captions are encoded as the pipeline encodes them at the
toy's `max_sequence_length` (16 T5 tokens), so training sees the text sequence sampling sees.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import build, data
from .detector import DETECTOR_FILE, train_detector


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


def _log(msg: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)


def _images(rng: np.random.Generator, n: int) -> Tensor:
    return torch.from_numpy(data.make_batch(n, rng)[0]) * 2 - 1


# ---- VAE -------------------------------------------------------------------------------------
def train_vae(cfg: TrainConfig, log: Callable[[str], None]):
    """Train the `AutoencoderKL` (L1 + MSE reconstruction, small KL) on fresh random images."""
    vae = build.vae_model(cfg.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.1
    )
    rng = np.random.default_rng(cfg.seed + 100)
    gen = torch.Generator().manual_seed(cfg.seed + 101)
    vae.train()
    for step in range(cfg.vae_steps):
        x = _images(rng, cfg.vae_batch)
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
def encode_dataset(vae, cfg: TrainConfig) -> tuple[Tensor, np.ndarray]:
    """Latent means (N, C, h, w) and labels (N, 6) of a fixed random data set."""
    rng = np.random.default_rng(cfg.seed + 200)
    latents, labels = [], []
    for start in range(0, cfg.dataset_size, 250):
        images, labs = data.make_batch(min(250, cfg.dataset_size - start), rng)
        latents.append(vae.encode(torch.from_numpy(images) * 2 - 1).latent_dist.mean)
        labels.append(labs)
    return torch.cat(latents), np.concatenate(labels)


# ---- text ------------------------------------------------------------------------------------
def all_labels() -> list[data.Labels]:
    """Every valid label combination (background colour differs from the shape colour)."""
    combos = itertools.product(*(range(len(v)) for v in data.ATTRIBUTES.values()))
    return [data.Labels(*c) for c in combos if c[1] != c[5]]


def label_key(labels: np.ndarray) -> np.ndarray:
    """A unique integer per label combination (mixed radix over `ATTRIBUTES`)."""
    key = np.zeros(len(labels), dtype=np.int64)
    for i, names in enumerate(data.ATTRIBUTES.values()):
        key = key * len(names) + labels[:, i]
    return key


@torch.no_grad()
def encode_captions(pipe, captions: list[str], chunk: int = 512) -> tuple[Tensor, Tensor]:
    """Prompt embeddings (N, CLIP_LENGTH + T5_LENGTH, D) and pooled embeddings (N, P)."""
    embeds, pooled = [], []
    for i in range(0, len(captions), chunk):
        part = captions[i : i + chunk]
        pe, _, pp, _ = pipe.encode_prompt(
            part, part, part, do_classifier_free_guidance=False,
            max_sequence_length=build.T5_LENGTH,
        )  # fmt: skip
        embeds.append(pe)
        pooled.append(pp)
    return torch.cat(embeds), torch.cat(pooled)


# ---- transformer -----------------------------------------------------------------------------
def sample_sigmas(n: int, gen: torch.Generator) -> Tensor:
    """Noise levels: logit-normal, then the scheduler's shift (as SD3's training scripts)."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    s = build.SCHEDULER_SHIFT
    return s * u / (1 + (s - 1) * u)


def train_transformer(
    latents: Tensor,
    keys: np.ndarray,
    text: tuple[Tensor, Tensor],
    empty: tuple[Tensor, Tensor],
    cfg: TrainConfig,
    log: Callable[[str], None],
):
    """Rectified-flow training of the transformer; returns the EMA model."""
    embeds, pooled = text
    model = build.transformer_model(cfg.seed)
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
    running = 0.0
    for step in range(cfg.steps):
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx]
        rows = torch.from_numpy(keys[idx.numpy()])
        ctx, pool = embeds[rows], pooled[rows]
        drop = torch.rand(cfg.batch, generator=gen) < cfg.drop_text
        ctx = torch.where(drop[:, None, None], empty[0], ctx)
        pool = torch.where(drop[:, None], empty[1], pool)
        sigma = sample_sigmas(cfg.batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = model(xt, ctx, pool, sigma * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
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
    return ema.eval()


# ---- the whole run ---------------------------------------------------------------------------
def train(out: str | Path, cfg: TrainConfig | None = None):
    """Train everything and save the pipeline (float16 safetensors) and detector to `out`."""
    from safetensors.torch import save_file

    cfg = cfg or TrainConfig()
    start = time.perf_counter()

    def log(msg: str) -> None:
        _log(msg, start)

    torch.manual_seed(cfg.seed)
    text = build.text_components(cfg.seed)
    vae = train_vae(cfg, log)
    latents, labels = encode_dataset(vae, cfg)
    shift = latents.mean().item()
    scale = 1.0 / (latents - shift).std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (latents - shift) * scale
    log(f"encoded {len(latents)} images: shift_factor {shift:.4f} scaling_factor {scale:.4f}")

    pipe = build.assemble(build.transformer_model(cfg.seed), vae, text)
    combos = all_labels()
    embeds, pooled = encode_captions(pipe, [data.caption(c) for c in combos])
    table = np.full(math.prod(len(v) for v in data.ATTRIBUTES.values()), -1)
    table[label_key(np.array(combos))] = np.arange(len(combos))
    empty_embeds, empty_pooled = encode_captions(pipe, [""])
    log(f"encoded {len(combos)} captions to {tuple(embeds.shape[1:])} text tokens")

    transformer = train_transformer(
        latents,
        table[label_key(labels)],
        (embeds, pooled),
        (empty_embeds[0], empty_pooled[0]),
        cfg,
        log,
    )
    pipe = build.assemble(transformer, vae, text)
    detector = train_detector(cfg.detector_steps, cfg.seed + 400, log)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
    log(f"saved pipeline and detector to {out}")
    return pipe, detector
