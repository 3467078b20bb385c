"""The procedural image distribution of the scenes model: landscapes with flat and detailed parts.

Every image is a small landscape: a smooth sky gradient (with or without a sun) above a plain
ground, and two objects standing on the horizon, one at the left and one at the right (a house
with windows and a door, a tree with a leafy crown, a striped fence, or nothing). Flat regions
(sky, ground) next to fine detail (windows, leaves, slats) are what real images have and the
first toy lacks: the denoiser settles flat regions early and keeps moving the detail, which is
the regime token pruning is meant for. Captions name the five labels, e.g. "a house at the left
and a tree at the right on sand under an orange sky with a sun". Images are float32 RGB arrays
in [0, 1], `IMAGE_SIZE` pixels square.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from ..trained.data import draw_batch

IMAGE_SIZE = 96  # 96 px -> 48 x 48 latents -> 24 x 24 = 576 image tokens
MAX_SEQUENCE_LENGTH = 24  # T5 tokens per caption (the pipeline call's `max_sequence_length`)
CLIP_LENGTH = 24  # the CLIP tokenizers' model_max_length: the longest caption is 20 tokens
TEXT_TOKENS = CLIP_LENGTH + MAX_SEQUENCE_LENGTH  # T = 48 against L = 576: 0.083, as SD3 at 1024²

SKIES = ("blue", "orange", "gray", "night")
GROUNDS = ("grass", "sand", "snow", "water")
OBJECTS = ("nothing", "house", "tree", "fence")
SUNS = ("no", "a")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "sky": SKIES,
    "ground": GROUNDS,
    "left": OBJECTS,
    "right": OBJECTS,
    "sun": SUNS,
}
# Pairs of labels scored together by the detector's accuracy (both right).
JOINT = (("left", "right"),)
WORDS = (
    SKIES + GROUNDS + OBJECTS
    + ("a", "an", "at", "the", "left", "and", "right", "on", "under", "sky", "with", "sun",
       "moon", "empty", "scene")
)  # fmt: skip

# Sky gradient (top, horizon) per sky label; ground (near horizon, bottom) per ground label.
_SKY = np.array(
    [
        [[0.16, 0.36, 0.85], [0.62, 0.80, 0.97]],
        [[0.55, 0.20, 0.42], [0.98, 0.62, 0.22]],
        [[0.42, 0.44, 0.48], [0.74, 0.75, 0.77]],
        [[0.02, 0.03, 0.12], [0.10, 0.14, 0.32]],
    ],
    dtype=np.float32,
)
_GROUND = np.array(
    [
        [[0.30, 0.62, 0.20], [0.16, 0.42, 0.10]],
        [[0.90, 0.80, 0.52], [0.78, 0.64, 0.38]],
        [[0.95, 0.96, 0.98], [0.80, 0.84, 0.90]],
        [[0.14, 0.40, 0.62], [0.06, 0.22, 0.42]],
    ],
    dtype=np.float32,
)
_SUN = np.array([[1.0, 0.92, 0.35], [0.92, 0.92, 0.85]], dtype=np.float32)  # day, night (moon)
_HOUSE_WALLS = np.array(
    [[0.86, 0.30, 0.22], [0.92, 0.86, 0.70], [0.55, 0.62, 0.80], [0.96, 0.78, 0.30]],
    dtype=np.float32,
)
_ROOF = np.array([0.42, 0.16, 0.12], dtype=np.float32)
_WINDOW = np.array([0.18, 0.22, 0.30], dtype=np.float32)
_LIT_WINDOW = np.array([1.0, 0.88, 0.45], dtype=np.float32)
_TRUNK = np.array([0.38, 0.24, 0.12], dtype=np.float32)
_LEAVES = np.array([[0.10, 0.45, 0.12], [0.26, 0.62, 0.16]], dtype=np.float32)
_FENCE = np.array([[0.62, 0.46, 0.28], [0.30, 0.20, 0.10]], dtype=np.float32)


class Labels(NamedTuple):
    """Class indices of one scene's attributes (see `ATTRIBUTES`)."""

    sky: int
    ground: int
    left: int
    right: int
    sun: int


def caption(labels: Labels) -> str:
    """The caption describing a scene with these labels."""
    left, right = OBJECTS[labels.left], OBJECTS[labels.right]
    if left == right == "nothing":
        things = "an empty scene"
    elif right == "nothing":
        things = f"a {left} at the left"
    elif left == "nothing":
        things = f"a {right} at the right"
    else:
        things = f"a {left} at the left and a {right} at the right"
    sun = "" if labels.sun == 0 else (" with a moon" if labels.sky == 3 else " with a sun")
    sky = SKIES[labels.sky]
    article = "an" if sky[0] in "aeiou" else "a"
    return f"{things} on {GROUNDS[labels.ground]} under {article} {sky} sky{sun}"


def random_labels(rng: np.random.Generator) -> Labels:
    """Uniformly random labels."""
    return Labels(*(int(rng.integers(len(v))) for v in ATTRIBUTES.values()))


def all_labels() -> list[Labels]:
    """Every label combination (each has its own caption)."""
    return [Labels(*c) for c in itertools.product(*(range(len(v)) for v in ATTRIBUTES.values()))]


def _soft(dist: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (H, W, 1) of a region given a signed distance in pixels."""
    return np.clip(0.5 - dist, 0.0, 1.0)[..., None]


def _paint(img: np.ndarray, dist: np.ndarray, colour: np.ndarray) -> np.ndarray:
    a = _soft(dist)
    return a * colour + (1 - a) * img


def _house(img, yy, xx, cx, base, s, rng, night):
    w, h = 15 * s, 14 * s
    body = np.maximum(np.abs(xx - cx) - w, np.maximum(yy - base, base - h - yy))
    img = _paint(img, body, _HOUSE_WALLS[rng.integers(len(_HOUSE_WALLS))])
    # Roof: a triangle over the body.
    top = base - h
    roof_h = 11 * s
    roof = np.maximum(yy - top, (np.abs(xx - cx) * roof_h / (w + 3 * s)) - (yy - top + roof_h))
    img = _paint(img, roof, _ROOF * rng.uniform(0.85, 1.15))
    # Windows: a 2 x 3 grid of small panes with crossbars (fine detail).
    window = _LIT_WINDOW if night else _WINDOW
    for r, c in itertools.product(range(2), range(3)):
        wy, wx = top + (3.5 + 5.5 * r) * s, cx + (c - 1) * 9 * s
        pane = np.maximum(np.abs(xx - wx) - 2.2 * s, np.abs(yy - wy) - 1.8 * s)
        img = _paint(img, pane, window)
        bars = np.minimum(np.abs(xx - wx), np.abs(yy - wy)) - 0.3
        img = _paint(img, np.maximum(pane, bars), np.array([0.9, 0.9, 0.9], np.float32))
    door = np.maximum(np.abs(xx - cx - 1.5 * s) - 2.2 * s, np.maximum(yy - base, base - 4 * s - yy))
    return _paint(img, door, _ROOF * 0.7)


def _tree(img, yy, xx, cx, base, s, rng):
    trunk = np.maximum(np.abs(xx - cx) - 2.0 * s, np.maximum(yy - base, base - 12 * s - yy))
    img = _paint(img, trunk, _TRUNK)
    cy, r = base - 19 * s, 11 * s * rng.uniform(0.9, 1.1)
    crown = np.sqrt((xx - cx) ** 2 + ((yy - cy) * 1.15) ** 2) - r
    # Leaves: two greens in a fine irregular pattern inside the crown.
    phase = rng.uniform(0, 2 * np.pi, size=2)
    pattern = np.sin(xx * 1.9 + phase[0]) * np.sin(yy * 1.7 + phase[1]) + 0.4 * np.sin(
        (xx + yy) * 1.1
    )
    leaves = np.where((pattern > 0)[..., None], _LEAVES[0], _LEAVES[1])
    a = _soft(crown)
    return a * leaves + (1 - a) * img


def _fence(img, yy, xx, cx, base, s, rng):
    w, h = 17 * s, 10 * s
    region = np.maximum(np.abs(xx - cx) - w, np.maximum(yy - base, base - h - yy))
    slats = np.abs(((xx - cx + w) % (4 * s)) - 2 * s) - 1.2 * s  # vertical slats
    rails = np.minimum(np.abs(yy - (base - 3 * s)), np.abs(yy - (base - 7.5 * s))) - 0.8 * s
    img = _paint(img, np.maximum(region, np.minimum(slats, rails)), _FENCE[0])
    return _paint(img, np.maximum(region, np.abs(slats) - 0.35), _FENCE[1])


def render(labels: Labels, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one (size, size, 3) float32 scene in [0, 1]; `rng` jitters layout and colours."""
    s = size / IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    horizon = size * rng.uniform(0.56, 0.66)
    night = labels.sky == 3
    # Sky: a vertical gradient from the top to the horizon; ground: the same below it.
    t = np.clip(yy / horizon, 0, 1)[..., None]
    sky = (1 - t) * _SKY[labels.sky, 0] + t * _SKY[labels.sky, 1]
    g = np.clip((yy - horizon) / (size - horizon), 0, 1)[..., None]
    ground = (1 - g) * _GROUND[labels.ground, 0] + g * _GROUND[labels.ground, 1]
    tint = rng.uniform(0.94, 1.06, size=3).astype(np.float32)
    img = np.where((yy < horizon)[..., None], sky, ground) * tint
    if labels.sun:
        sx, sy = size * rng.uniform(0.3, 0.7), horizon * rng.uniform(0.2, 0.45)
        disk = np.sqrt((xx - sx) ** 2 + (yy - sy) ** 2) - 7 * s
        img = _paint(img, disk, _SUN[1 if night else 0])
    base = horizon + 4 * s * rng.uniform(0.8, 1.2)
    for slot, kind in enumerate((labels.left, labels.right)):
        cx = size * (0.26 if slot == 0 else 0.74) + rng.uniform(-3, 3) * s
        if kind == 1:
            img = _house(img, yy, xx, cx, base, s, rng, night)
        elif kind == 2:
            img = _tree(img, yy, xx, cx, base, s, rng)
        elif kind == 3:
            img = _fence(img, yy, xx, cx, base, s, rng)
    return np.clip(img, 0, 1).astype(np.float32)


def make_batch(
    n: int, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """`n` random images (n, 3, size, size) in [0, 1] and their labels (n, 5) int64."""
    return draw_batch(n, rng, size, random_labels, render)
