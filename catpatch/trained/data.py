"""What every shipped model's data module shares (numpy only, no torch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def draw_batch(
    n: int,
    rng: np.random.Generator,
    size: int,
    random_labels: Callable[[np.random.Generator], Any],
    render: Callable[[Any, np.random.Generator, int], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, 3, size, size) and labels (n, attributes) int64 of a data module's
    `random_labels(rng)` and `render(labels, rng, size)`, drawn from `rng` in that order."""
    labels = [random_labels(rng) for _ in range(n)]
    images = np.stack([render(lab, rng, size) for lab in labels]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.array(labels, dtype=np.int64)
