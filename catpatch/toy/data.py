"""The procedural image distribution of the toy model: one coloured shape on a textured background.

Every image is drawn from six labels (size, colour, kind, position, texture, background colour)
and described by a caption such as "a small red triangle at the top left on a striped blue
background". Images are float32 RGB arrays in [0, 1], `IMAGE_SIZE` pixels square.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from ..trained.data import draw_batch

IMAGE_SIZE = 64
# T5 tokens per caption (the pipeline call's `max_sequence_length`): every caption fits.
MAX_SEQUENCE_LENGTH = 16
CLIP_LENGTH = 16  # the CLIP tokenizers' model_max_length: the longest caption is 15 tokens
TEXT_TOKENS = CLIP_LENGTH + MAX_SEQUENCE_LENGTH  # T of the toy's transformer calls

SIZES = ("small", "medium", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
KINDS = ("circle", "square", "triangle", "cross")
POSITIONS = (
    "at the top left",
    "at the top",
    "at the top right",
    "at the left",
    "in the center",
    "at the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
TEXTURES = ("plain", "striped", "dotted", "checkered")

# Label name -> its class names, in the order of the `Labels` fields.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": SIZES,
    "colour": COLOURS,
    "kind": KINDS,
    "position": POSITIONS,
    "texture": TEXTURES,
    "background": COLOURS,
}
# Pairs of labels scored together by the detector's accuracy (both right).
JOINT = (("colour", "position"),)
WORDS = tuple(
    dict.fromkeys(w for names in ATTRIBUTES.values() for name in names for w in name.split()).keys()
) + ("a", "on", "background")

_RGB = np.array(
    [
        [0.92, 0.12, 0.10],
        [0.10, 0.78, 0.20],
        [0.15, 0.30, 0.95],
        [0.95, 0.88, 0.10],
        [0.62, 0.18, 0.82],
        [0.95, 0.95, 0.95],
    ],
    dtype=np.float32,
)
_RADIUS = (6.0, 9.0, 13.0)  # half extent of the shape, in pixels at IMAGE_SIZE 64
_PERIOD = 8  # texture period in pixels


class Labels(NamedTuple):
    """Class indices of one image's attributes (see `ATTRIBUTES`)."""

    size: int
    colour: int
    kind: int
    position: int
    texture: int
    background: int


def caption(labels: Labels) -> str:
    """The caption describing an image with these labels."""
    return (
        f"a {SIZES[labels.size]} {COLOURS[labels.colour]} {KINDS[labels.kind]} "
        f"{POSITIONS[labels.position]} on a {TEXTURES[labels.texture]} "
        f"{COLOURS[labels.background]} background"
    )


def random_labels(rng: np.random.Generator) -> Labels:
    """Uniformly random labels; the background colour always differs from the shape's."""
    colour = int(rng.integers(len(COLOURS)))
    background = int(rng.integers(len(COLOURS) - 1))
    background += background >= colour
    return Labels(
        size=int(rng.integers(len(SIZES))),
        colour=colour,
        kind=int(rng.integers(len(KINDS))),
        position=int(rng.integers(len(POSITIONS))),
        texture=int(rng.integers(len(TEXTURES))),
        background=background,
    )


def all_labels() -> list[Labels]:
    """Every valid label combination (background colour differs from the shape colour)."""
    combos = itertools.product(*(range(len(v)) for v in ATTRIBUTES.values()))
    return [Labels(*c) for c in combos if c[1] != c[5]]


def _background(texture: int, rgb: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    light, dark = 0.62 * rgb + 0.08, 0.32 * rgb + 0.04
    p = _PERIOD
    if texture == 0:
        mask = np.zeros_like(xx, dtype=bool)
    elif texture == 1:
        mask = ((xx + yy) // 5) % 2 == 1
    elif texture == 2:
        cy, cx = (yy % p) - p / 2 + 0.5, (xx % p) - p / 2 + 0.5
        mask = cy * cy + cx * cx <= 4.0
    else:
        mask = ((xx // p) + (yy // p)) % 2 == 1
    return np.where(mask[..., None], dark, light)


def _shape_distance(kind: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) to the shape centred at 0."""
    if kind == 0:
        return np.sqrt(dx * dx + dy * dy) - r
    if kind == 1:
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.82 * r
    if kind == 2:
        # Upward triangle: apex (0, -r), base at y = 0.75 r with half width r.
        base = dy - 0.75 * r
        slope = 1.75 * r / r  # rise over half width
        norm = np.sqrt(1 + slope * slope)
        side = (slope * np.abs(dx) - (dy + r)) / norm
        return np.maximum(base, side)
    t = 0.34 * r
    ax, ay = np.abs(dx), np.abs(dy)
    return np.minimum(np.maximum(ax - r, ay - t), np.maximum(ax - t, ay - r))


def render(labels: Labels, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one (size, size, 3) float32 image in [0, 1]; `rng` jitters position and phase."""
    scale = size / 64
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shift = rng.integers(_PERIOD, size=2)
    img = _background(labels.texture, _RGB[labels.background], yy + shift[0], xx + shift[1])
    row, col = divmod(labels.position, 3)
    cy = (16 + 16 * row + rng.uniform(-2.5, 2.5)) * scale
    cx = (16 + 16 * col + rng.uniform(-2.5, 2.5)) * scale
    r = _RADIUS[labels.size] * scale * rng.uniform(0.92, 1.08)
    dist = _shape_distance(labels.kind, xx + 0.5 - cx, yy + 0.5 - cy, r)
    alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]
    return (alpha * _RGB[labels.colour] + (1 - alpha) * img).astype(np.float32)


def make_batch(
    n: int, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """`n` random images (n, 3, size, size) in [0, 1] and their labels (n, 6) int64."""
    return draw_batch(n, rng, size, random_labels, render)
