"""The resumable record of a `generate` folder: each process appends one JSON line per finished
image to its shard `manifest.rank{r}.jsonl` (`SHARD_GLOB`) after the PNG is written
atomically, `read_records` reads `MANIFEST` and the shards back, `_completed` finds the
images already made (an error if made with other `GENERATION_KEYS` values than `_recorded`,
the settings every line carries) and `merge_manifest` folds the shards into `MANIFEST`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...dtypes import default_dtype_name
from .prompts import Job
from .settings import GenerateError, GenerateSettings

MANIFEST = "manifest.jsonl"
SHARD_GLOB = "manifest.rank*.jsonl"
# Settings that change the pixels: a resumed run must match the images already in --out.
GENERATION_KEYS = (
    "model", "cat", "selection", "keep_ratio", "warmup_steps", "num_clusters", "macs",
    "forecast", "steps", "guidance", "height", "width", "seed", "dtype", "lora", "lora_scale",
)  # fmt: skip


def read_records(out: str | Path) -> dict[str, dict[str, Any]]:
    """Manifest records of a `generate` folder by file name: `manifest.jsonl`, then the shards
    of an unfinished run (a later line for the same file wins; torn lines are skipped)."""
    out = Path(out)
    records: dict[str, dict[str, Any]] = {}
    for path in [out / MANIFEST, *sorted(out.glob(SHARD_GLOB))]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the last line of a killed run
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                records[record["file"]] = record
    return records


def merge_manifest(out: str | Path, jobs: Sequence[Job]) -> list[str]:
    """Rewrite `manifest.jsonl` from all records whose PNG exists (one line per file, prompt
    order), remove the shards; return the file names of `jobs` that are still missing."""
    out = Path(out)
    records = {f: r for f, r in read_records(out).items() if (out / f).is_file()}
    ordered = sorted(records.values(), key=lambda r: (r["prompt_index"], r["image_index"]))
    _write_atomic(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in ordered))
    for shard in out.glob(SHARD_GLOB):
        shard.unlink()
    return [job.file for job in jobs if job.file not in records]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_png(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _completed(out: Path, jobs: Sequence[Job], settings: dict[str, Any]) -> set[str]:
    """File names of `jobs` already made (PNG and record); error if made differently."""
    by_file = {job.file: job for job in jobs}
    done = set()
    for name, record in read_records(out).items():
        job = by_file.get(name)
        if job is None or not (out / name).is_file():
            continue
        old = record.get("settings", {})
        made = {"prompt": record.get("prompt"), "seed": record.get("seed")}
        wanted = {"prompt": job.prompt, "seed": job.seed}
        keys = [k for k in GENERATION_KEYS if k not in ("height", "width") or settings[k]]
        made.update({k: old.get(k) for k in keys})
        wanted.update({k: settings[k] for k in keys})
        for key, value in wanted.items():
            if made[key] != value:
                raise GenerateError(
                    f"{out / name} was made with {key}={made[key]!r}, this run asks for "
                    f"{value!r}: use another --out, or the same settings to resume"
                )
        done.add(name)
    return done


def _recorded(settings: GenerateSettings, device, world_size: int, loaded: bool) -> dict:
    """The settings every manifest line carries (height/width None until the model is known)."""
    model = settings.model
    if not loaded and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    height, width = settings.size or (None, None)
    cat = settings.cat
    budgeted = cat and settings.macs is not None  # the budget replaces the manual knobs
    manual = cat and not budgeted
    return {
        "model": model, "cat": cat,
        "policy": _policy(settings) if cat else None,
        "selection": settings.selection if manual else None,
        "keep_ratio": settings.keep_ratio if manual else None,
        "warmup_steps": settings.warmup_steps if manual else None,
        "num_clusters": settings.num_clusters if manual else None,
        "macs": settings.macs if budgeted else None,
        "forecast": settings.forecast if budgeted else None,
        "calibration": _path(settings.calibration) if budgeted else None,
        "steps": settings.steps, "guidance": settings.guidance, "height": height, "width": width,
        "seed": settings.seed, "images_per_prompt": settings.images_per_prompt,
        "batch_size": settings.batch_size,
        "dtype": settings.dtype or default_dtype_name(device),
        "device": str(device), "lora": settings.lora,
        "lora_scale": settings.lora_scale if settings.lora else None,
        "compile": settings.compile, "world_size": world_size,
    }  # fmt: skip


def _policy(settings: GenerateSettings) -> str:
    """What the run's policy is, in words ("planned steps (MACs 0.4)", "step reuse", ...)."""
    from ... import policies
    from .pipeline import _cat_config

    return policies.policy_label(_cat_config(settings))


def _path(path: str | None) -> str | None:
    """A file's path as the manifest records it: absolute when it exists."""
    if path is None or not Path(path).expanduser().exists():
        return path
    return str(Path(path).expanduser().resolve())
