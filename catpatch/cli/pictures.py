"""Pictures that explain themselves: image grids with a title, column and row headings, a
legend and a caption, drawn with PIL only (no plotting library needed).

Text is ASCII: PIL's built-in font has no other glyphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

PAD = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)


@cache
def font(size: int = 14):
    """PIL's built-in font at `size` px (a fixed-size bitmap font on very old Pillow)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_width(text: str, size: int = 14) -> int:
    return int(np.ceil(font(size).getlength(text)))


def line_height(size: int = 14) -> int:
    return int(size * 1.35) + 1


def wrap(text: str, width_px: int, size: int = 14) -> list[str]:
    """`text` broken at spaces into lines no wider than `width_px` (newlines kept)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and text_width(candidate, size) > width_px:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] as uint8."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W, ...) array by an integer factor."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


@dataclass
class Swatch:
    """One legend entry: a small picture (H, W, 3 uint8) and its label."""

    image: np.ndarray
    label: str


@dataclass
class Figure:
    """A grid of equally sized tiles (uint8 RGB arrays) with headings, legend and caption."""

    tiles: list[list[np.ndarray]]  # rows of tiles
    title: str = ""
    columns: Sequence[str] = ()  # a heading above each column
    rows: Sequence[str] = ()  # a heading above each row (e.g. its prompt), full width
    row_labels: Sequence[str] = ()  # a short label left of each row
    legend: list[Swatch] = field(default_factory=list)
    caption: str = ""
    gap: int = 4
    text_size: int = 14
    wrap_columns: int = 0  # > 0: at most this many columns side by side, then a new band

    def _bands(self) -> list[tuple[list[list[np.ndarray]], list[str]]]:
        """The grid cut into bands of at most `wrap_columns` columns: (rows, headings)."""
        ncols = max(len(r) for r in self.tiles)
        step = self.wrap_columns or ncols
        return [
            ([row[i : i + step] for row in self.tiles], list(self.columns[i : i + step]))
            for i in range(0, ncols, step)
        ]

    def render(self):
        """The figure as a PIL image."""
        from PIL import Image, ImageDraw

        size, gap = self.text_size, self.gap
        tile_h, tile_w = self.tiles[0][0].shape[:2]
        bands = self._bands()
        ncols = max(len(r) for r in bands[0][0])
        label_w = max((text_width(t, size) for t in self.row_labels), default=0)
        left = PAD + (label_w + PAD if self.row_labels else 0)
        grid_w = ncols * tile_w + (ncols - 1) * gap
        width = max(left + grid_w + PAD, 320)
        inner = width - 2 * PAD
        title = wrap(self.title, inner, size + 4) if self.title else []
        caption = wrap(self.caption, inner, size) if self.caption else []
        row_heads = [wrap(t, grid_w, size) for t in self.rows] if self.rows else []
        col_lines = max((len(wrap(t, tile_w, size)) for t in self.columns), default=0)
        legend_rows = self._legend_layout(inner, size)

        height = PAD + len(title) * line_height(size + 4) + (PAD if title else 0)
        for _ in bands:
            height += col_lines * line_height(size) + (PAD if len(bands) > 1 else 0)
            for i in range(len(self.tiles)):
                height += len(row_heads[i]) * line_height(size) if row_heads else 0
                height += tile_h + gap
        height += PAD + sum(h for h, _ in legend_rows) + len(caption) * line_height(size) + PAD
        canvas = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(canvas)

        y = PAD
        for line in title:
            draw.text((PAD, y), line, font=font(size + 4), fill=INK)
            y += line_height(size + 4)
        y += PAD if title else 0
        for tiles, headings in bands:
            for c, heading in enumerate(headings):
                x = left + c * (tile_w + gap)
                for k, line in enumerate(wrap(heading, tile_w, size)):
                    cx = x + (tile_w - text_width(line, size)) // 2
                    draw.text((cx, y + k * line_height(size)), line, font=font(size), fill=INK)
            y += col_lines * line_height(size)
            for i, row in enumerate(tiles):
                if row_heads:
                    for line in row_heads[i]:
                        draw.text((left, y), line, font=font(size), fill=MUTED)
                        y += line_height(size)
                if self.row_labels:
                    label = self.row_labels[i]
                    draw.text((PAD, y + tile_h // 2 - size // 2), label, font=font(size), fill=INK)
                for c, tile in enumerate(row):
                    canvas.paste(Image.fromarray(tile), (left + c * (tile_w + gap), y))
                y += tile_h + gap
            y += PAD if len(bands) > 1 else 0
        y += PAD
        for row_h, entries in legend_rows:
            x = PAD
            for swatch, entry_w in entries:
                sh, sw = swatch.image.shape[:2]
                canvas.paste(Image.fromarray(swatch.image), (x, y + (row_h - sh) // 2))
                ty = y + (row_h - size) // 2 - 2
                draw.text((x + sw + 6, ty), swatch.label, font=font(size), fill=INK)
                x += entry_w
            y += row_h
        for line in caption:
            draw.text((PAD, y), line, font=font(size), fill=MUTED)
            y += line_height(size)
        return canvas

    def _legend_layout(self, inner: int, size: int) -> list[tuple[int, list]]:
        """Legend entries packed into rows: [(row height, [(swatch, entry width)])]."""
        rows: list[tuple[int, list]] = []
        current: list = []
        used = 0
        for swatch in self.legend:
            sh, sw = swatch.image.shape[:2]
            entry_w = sw + 6 + text_width(swatch.label, size) + 3 * PAD
            if current and used + entry_w > inner:
                rows.append((max(line_height(size), *(s.image.shape[0] for s, _ in current)) + 4,
                             current))  # fmt: skip
                current, used = [], 0
            current.append((swatch, entry_w))
            used += entry_w
        if current:
            rows.append(
                (max(line_height(size), *(s.image.shape[0] for s, _ in current)) + 4, current)
            )
        return rows

    def save(self, path) -> None:
        self.render().save(path)


def outline_cells(tile: np.ndarray, mask: np.ndarray, cell: int) -> np.ndarray:
    """Draw a two-tone outline (white outside, black inside) around every True cell of `mask`
    (grid of `cell`-pixel cells) on a uint8 tile: it shows on dark and light images alike."""
    out = tile.copy()
    if cell < 5:
        return out
    ys, xs = np.nonzero(mask)
    for y, x in zip(ys * cell, xs * cell, strict=True):
        out[y, x : x + cell] = out[y + cell - 1, x : x + cell] = 255
        out[y : y + cell, x] = out[y : y + cell, x + cell - 1] = 255
        out[y + 1, x + 1 : x + cell - 1] = out[y + cell - 2, x + 1 : x + cell - 1] = 0
        out[y + 1 : y + cell - 1, x + 1] = out[y + 1 : y + cell - 1, x + cell - 2] = 0
    return out


def region_borders(labels: np.ndarray, cell: int) -> np.ndarray:
    """Boolean (H*cell, W*cell) mask of the pixels on the border between two labels."""
    big = upscale(labels, cell)
    edge = np.zeros(big.shape, dtype=bool)
    edge[:, 1:] |= big[:, 1:] != big[:, :-1]
    edge[1:, :] |= big[1:, :] != big[:-1, :]
    return edge


def number_regions(tile: np.ndarray, labels: np.ndarray, cell: int, size: int = 12) -> np.ndarray:
    """Write each region's number (label + 1), white with a black outline, on the member token
    nearest to the region's centre."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(tile)
    draw = ImageDraw.Draw(image)
    for label in np.unique(labels):
        ys, xs = np.nonzero(labels == label)
        k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        cx, cy = (xs[k] + 0.5) * cell, (ys[k] + 0.5) * cell
        draw.text((cx, cy), str(label + 1), font=font(size), fill=(255, 255, 255), anchor="mm",
                  stroke_width=2, stroke_fill=(0, 0, 0))  # fmt: skip
    return np.asarray(image)
