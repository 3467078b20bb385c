"""The prompts of a run and the images they ask for: `read_prompts` reads a .txt, .jsonl, .json
(COCO captions) or .tsv/.csv (PartiPrompts) file, taking the first of `PROMPT_COLUMNS` a row
holds; `jobs_for` lists every image as a `Job`, image j of prompt i seeded with
`seed + SEED_STRIDE*i + j` and named `{i:05d}_{j:03d}.png`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import GenerateError

SEED_STRIDE = 1000  # seed of image j of prompt i: seed + SEED_STRIDE*i + j
PROMPT_COLUMNS = ("prompt", "caption", "text")


@dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return f"{self.prompt_index:05d}_{self.image_index:03d}.png"


def jobs_for(prompts: Sequence[str], images_per_prompt: int, seed: int) -> list[Job]:
    """Every image of a run, in prompt order."""
    return [
        Job(i, j, prompt, seed + SEED_STRIDE * i + j)
        for i, prompt in enumerate(prompts)
        for j in range(images_per_prompt)
    ]


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts of a file: `.txt` one per line (blank lines skipped); `.jsonl` objects with a
    prompt/caption/text field (or strings); `.json` a list of strings or a COCO captions file
    (`annotations[*].caption`); `.tsv`/`.csv` with a Prompt/caption/text column (PartiPrompts).
    """
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"prompts file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            prompts = [_prompt_of(row) for row in rows]
        elif suffix == ".json":
            data = json.loads(text)
            rows = data["annotations"] if isinstance(data, dict) else data
            prompts = [_prompt_of(row) for row in rows]
        elif suffix in (".tsv", ".csv"):
            reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
            prompts = [_prompt_of(row) for row in reader]
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as err:
        raise GenerateError(f"cannot read prompts from {path}: {err}") from None
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise GenerateError(f"prompts file {path} holds no prompts")
    return prompts


def _prompt_of(row: Any) -> str:
    if isinstance(row, str):
        return row.strip()
    keys = {k.lower(): k for k in row if isinstance(k, str)}
    for name in PROMPT_COLUMNS:
        if name in keys:
            return str(row[keys[name]]).strip()
    raise KeyError(f"no {'/'.join(PROMPT_COLUMNS)} field in {row!r}")
