"""`Row`: one configuration of the study and what it measured; the resumable record
`rows.jsonl` that an interrupted study continues from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    """One configuration of the study and what it measured."""

    steps: int
    method: str
    setting: str  # what sets the MACs when α does not: the combined target, the interval
    keep_ratio: float
    warmup_steps: int
    num_clusters: int
    macs_ratio: float
    psnr: float  # dB, mean over images, against the unpatched images of the same steps
    psnr_min: float
    ssim: float
    latent_error: float  # ||z - z_ref|| / ||z_ref|| of the final latents, mean
    # detector: the model's label pair both right (toy: colour and position; scenes: left and
    # right object; the field keeps its first name so older rows.jsonl files still resume)
    accuracy_colour_position: float
    accuracy_all: float  # detector: all attributes right
    seconds: float
    psnr_each: tuple[float, ...] = ()  # per image, for paired comparisons (rows.jsonl only)

    def table(self) -> dict:
        """The fields written to study.csv / study.json."""
        return {k: v for k, v in asdict(self).items() if k != "psnr_each"}


def append_row(path: Path, key: str, images: int, row: Row) -> None:
    """Record a finished run in `rows.jsonl`, keyed by its configuration."""
    with open(path, "a") as f:
        f.write(json.dumps({"key": key, "images": images, **asdict(row)}) + "\n")


def load_done(path: Path, images: int) -> dict[str, Row]:
    """Rows of an earlier, interrupted study in the same folder with the same image count."""
    if not path.exists():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        key = record.pop("key")
        if record.pop("images") == images:
            done[key] = Row(**record)
    return done
