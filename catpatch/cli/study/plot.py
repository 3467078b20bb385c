"""`study.png`: PSNR against MACs per method, with catpatch's frontier."""

from __future__ import annotations

from pathlib import Path

from .methods import CATPATCH_METHODS, METHODS, PEERS, PLANNED, in_sweep
from .rows import Row


def plot(rows: list[Row], path: Path) -> None:
    """PSNR against MACs ratio, one line per method, one panel per step count; the dashed
    line is catpatch's frontier (the best PSNR at or below each MACs, over its methods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({r.steps for r in rows})
    fig, axes = plt.subplots(1, len(steps_list), figsize=(7 * len(steps_list), 5), squeeze=False)
    for ax, steps in zip(axes[0], steps_list, strict=True):
        shown = [r for r in rows if r.steps == steps and not in_sweep(r)]
        for i, method in enumerate((*METHODS, PLANNED)):
            points = sorted((r.macs_ratio, r.psnr) for r in shown if r.method == method)
            if points:
                x, y = zip(*points, strict=True)
                style = "s--" if method in PEERS else "o-"
                color = plt.cm.tab20(i % 20)  # more methods than the default cycle's 10 colours
                ax.plot(x, y, style, label=method, markersize=4, color=color)
        front = frontier([r for r in shown if r.method in CATPATCH_METHODS])
        if len(front) > 1:  # one point draws no line: no legend entry for it either
            x, y = zip(*((r.macs_ratio, r.psnr) for r in front), strict=True)
            ax.step(x, y, "k:", where="post", label="catpatch frontier", linewidth=1)
        ax.set_title(f"{steps} steps (t0 8, 20 clusters)")
        ax.set_xlabel("MACs / unpatched")
        ax.set_ylabel("PSNR vs unpatched (dB)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without the default t0 / clusters has none
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier(rows: list[Row]) -> list[Row]:
    """The rows no other row beats with fewer or equal MACs and a higher PSNR, by MACs."""
    best, front = float("-inf"), []
    for row in sorted(rows, key=lambda r: (r.macs_ratio, -r.psnr)):
        if row.psnr > best:
            best = row.psnr
            front.append(row)
    return front
