"""What a `catpatch generate` run is asked for and what it did: `GenerateSettings` (the fields
mirror the command-line options), `GenerateResult` (the counts and time of one process's
run) and `GenerateError`, the user error every part of the command raises with its fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...config import CATConfig
from ..common import CommandError

DEFAULT_GUIDANCE = 7.0  # of `catpatch generate`; the toy model's own is 5.0


class GenerateError(CommandError):
    """A user error of `catpatch generate`; the message names the fix (exit status 2)."""


@dataclass
class GenerateSettings:
    """What `catpatch generate` makes; the fields mirror the command-line options."""

    model: str  # a pipeline folder, a hub id, or "toy" (the pipeline shipped in catpatch)
    prompts: list[str]
    out: str | Path
    cat: bool = True
    keep_ratio: float = 0.3
    warmup_steps: int = 8
    num_clusters: int = 20
    selection: str = CATConfig.selection  # the library's default policy
    macs: float | None = None  # the budget (CATConfig.macs), replaces the three above; the
    # command fills in the library's default budget when no knob is given (resolve_cat_options)
    forecast: str = CATConfig.forecast  # with macs
    calibration: str | None = None  # with macs: a calibration file (None: the model's own)
    steps: int = 28
    guidance: float = DEFAULT_GUIDANCE
    size: tuple[int, int] | None = None  # (height, width); None: the model's native size
    seed: int = 0
    images_per_prompt: int = 1
    batch_size: int = 1
    dtype: str | None = None  # bf16 on cuda, fp32 elsewhere
    device: str | None = None  # cuda if available (the process's GPU under a launcher), else cpu
    lora: str | None = None
    lora_scale: float = 1.0
    compile: bool = False
    progress: bool = True


@dataclass
class GenerateResult:
    """What a `run` did (in this process; `missing` is filled in on the main process)."""

    out: Path
    total: int  # images the prompt list asks for
    skipped: int  # already in --out before this run
    generated: int  # made by this process
    rank: int = 0
    world_size: int = 1
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cat_summary: str | None = None
