"""A small CNN that reads the labels of a trained model's image back: the measurable quality check.

Trained on procedural images with known labels (blurred and noised at random, so it also reads
decoded images); `accuracy` compares its predictions with the labels a caption asked for. The
model's data module (`catpatch.toy.data`, `catpatch.scenes.data`) says which attributes there
are (`ATTRIBUTES`), which pairs count together (`JOINT`) and how to draw images (`make_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DETECTOR_FILE = "detector.safetensors"
INPUT_SIZE = 64  # images are resized to this many pixels square before the first conv


class Detector(nn.Module):
    """Four conv layers and one linear head per attribute of `attributes` (the class names of
    each label: a data module's `ATTRIBUTES`)."""

    def __init__(self, attributes: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.attributes = dict(attributes)
        chans = (3, 32, 32, 64, 64)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans, chans[1:], strict=False)):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.hidden = nn.Linear(64 * 8 * 8, 256)
        self.heads = nn.Linear(256, sum(len(v) for v in self.attributes.values()))

    def forward(self, images: Tensor) -> list[Tensor]:
        """Logits per attribute for (N, 3, H, W) images in [0, 1] (resized to 64 px)."""
        if images.shape[-1] != INPUT_SIZE:
            images = F.interpolate(images, size=INPUT_SIZE, mode="area")
        h = F.relu(self.hidden(self.features(images * 2 - 1).flatten(1)))
        return list(self.heads(h).split([len(v) for v in self.attributes.values()], dim=1))

    @torch.no_grad()
    def predict(self, images: np.ndarray | Tensor) -> np.ndarray:
        """Predicted labels (N, 6) for images as (N, H, W, 3) arrays or (N, 3, H, W) tensors."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        images = images.float()
        chunks = [self(b) for b in images.split(256)]
        out = [torch.cat(parts) for parts in zip(*chunks, strict=True)]
        return torch.stack([o.argmax(1) for o in out], dim=1).numpy()


def accuracy(predicted: np.ndarray, labels: np.ndarray, dataset: ModuleType) -> dict[str, float]:
    """Per-attribute accuracy, each pair of `dataset.JOINT` (both right; the toy's
    `colour+position`) and `all` (every label right)."""
    right = np.asarray(predicted) == np.asarray(labels)
    names = list(dataset.ATTRIBUTES)
    acc = {name: float(right[:, i].mean()) for i, name in enumerate(names)}
    for a, b in dataset.JOINT:
        acc[f"{a}+{b}"] = float((right[:, names.index(a)] & right[:, names.index(b)]).mean())
    acc["all"] = float(right.all(axis=1).mean())
    return acc


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Blur half the batch (random Gaussian width) and add a little noise to all."""
    sigma = 0.3 + 1.2 * torch.rand((), generator=gen).item()
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 5, 5)
    half = x.shape[0] // 2
    blurred = F.conv2d(F.pad(x[:half], (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    x = torch.cat([blurred, x[half:]])
    noise = torch.randn(x.shape, generator=gen) * 0.04 * torch.rand((), generator=gen)
    return (x + noise).clamp(0, 1)


def train_detector(
    steps: int = 800,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    batch: int = 64,
    *,
    dataset: ModuleType,
) -> Detector:
    """Train a `Detector` on fresh random procedural images of `dataset` (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Detector(dataset.ATTRIBUTES)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        images, labels = dataset.make_batch(batch, rng)
        logits = model(_augment(torch.from_numpy(images), gen))
        target = torch.from_numpy(labels)
        loss = sum(F.cross_entropy(lg, target[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % 200 == 0:
            log(f"detector step {step + 1}/{steps} loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


def load_detector(path: str | Path, dataset: ModuleType) -> Detector:
    """A `Detector` of `dataset`'s labels with the weights of a `detector.safetensors` file
    (float32, CPU)."""
    from safetensors.torch import load_file

    model = Detector(dataset.ATTRIBUTES)
    state = load_file(str(path))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False)
