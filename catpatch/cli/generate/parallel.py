"""A whole run, split over the processes of `accelerate launch` or `torchrun`: `run` checks the
settings (`check`), finds the images still missing, gives each process a contiguous share
of them through accelerate's `PartialState`, waits for all, then merges the manifest on the
main process; `_close_process_group` ends the torch.distributed group when the command is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ...dtypes import DTYPE_NAMES, torch_dtype
from ..budget import check_budget_steps, check_calibration
from ..common import (
    CommandError,
    check_device,
    check_output_folder,
    output_folder,
)
from .loop import _generate_share
from .manifest import _completed, _recorded, merge_manifest
from .pipeline import _as_text_to_image, _cat_config, _prepare, check_lora, load_pipeline
from .prompts import SEED_STRIDE, jobs_for
from .settings import GenerateError, GenerateResult, GenerateSettings


def run(
    settings: GenerateSettings,
    pipe: Any = None,
    on_image: Callable[[dict[str, Any]], None] | None = None,
) -> GenerateResult:
    """Make every image of `settings` not yet in `settings.out` (this process's share under a
    launcher). `pipe`: an already loaded pipeline to use instead of loading `settings.model`
    (patched in place, not moved). `on_image(record)` runs after each image is written and
    recorded. Raises `GenerateError` for user errors."""
    import torch
    from accelerate import PartialState

    started = time.perf_counter()
    check(settings)
    wanted = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    state = PartialState(cpu=wanted.startswith("cpu"))  # plain PartialState() misreads torchrun
    on_state = wanted == "cuda" and state.device.type == "cuda"  # the process's own GPU
    device = state.device if on_state else torch.device(wanted)
    recorded = _recorded(settings, device, state.num_processes, loaded=pipe is not None)
    # a run that fails before its first image (bad size, model, ...) leaves no empty folder
    with output_folder(settings.out) as out:
        return _run(settings, pipe, on_image, state, device, recorded, out, started)


def _run(settings, pipe, on_image, state, device, recorded, out, started) -> GenerateResult:
    import torch

    jobs = jobs_for(settings.prompts, settings.images_per_prompt, settings.seed)
    done = _completed(out, jobs, recorded)  # every process reads the same snapshot
    pending = [job for job in jobs if job.file not in done]
    result = GenerateResult(out, len(jobs), len(done), 0, state.process_index, state.num_processes)
    if state.is_main_process:
        for tmp in out.glob(".*.tmp"):  # left by a killed run
            tmp.unlink(missing_ok=True)
    state.wait_for_everyone()  # nobody writes before every process has read

    oom = None
    with state.split_between_processes(pending) as mine:
        if mine:
            if pipe is None:
                pipe = load_pipeline(settings.model, device, torch_dtype(recorded["dtype"]))
            pipe = _as_text_to_image(pipe)
            if recorded["height"] is None:
                side = pipe.default_sample_size * pipe.vae_scale_factor
                recorded.update(height=side, width=side)
            pipe, extra = _prepare(pipe, settings, recorded["height"], recorded["width"])
            oom = _generate_share(
                pipe, extra, mine, out, recorded, state, settings.progress, on_image, result
            )
    if oom is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    state.wait_for_everyone()
    if state.is_main_process:
        result.missing = merge_manifest(out, jobs)
    result.seconds = time.perf_counter() - started
    if oom is not None:
        raise GenerateError(oom)
    return result


def check(settings: GenerateSettings) -> None:
    """GenerateError for the settings that are wrong before any model is loaded."""
    if not settings.prompts:
        raise GenerateError("no prompts: pass --prompt or --prompts-file")
    if not 1 <= settings.images_per_prompt <= SEED_STRIDE:
        raise GenerateError(f"--images-per-prompt must be in 1..{SEED_STRIDE}")
    if settings.batch_size < 1 or settings.steps < 1:
        raise GenerateError("--batch-size and --steps must be >= 1")
    if settings.dtype not in (None, *DTYPE_NAMES):
        raise GenerateError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}")
    if settings.cat:
        _cat_config(settings)
        try:
            check_budget_steps(settings.macs, settings.steps)
            if settings.macs is not None and settings.calibration is not None:
                check_calibration(settings.calibration)
        except CommandError as err:
            raise GenerateError(str(err)) from None
    if settings.lora:
        check_lora(settings.lora)
    try:
        check_device(settings.device)
        check_output_folder(settings.out)
    except CommandError as err:
        raise GenerateError(str(err)) from None


def _close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
