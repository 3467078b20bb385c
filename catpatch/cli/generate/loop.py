"""The per-image loop of one process: `_generate_share` makes its share of the images in
batches with per-image CPU generators, saves each PNG and appends its manifest line (prompt,
seed, settings, time and the CAT figures of its batch, `_cat_figures`; `warm` is false for the
first batch of each process, whose time includes one-off start-up costs), and returns the
out-of-memory message (`_oom_message`) instead of raising when the device runs out.
"""

from __future__ import annotations

import time
from typing import Any

from .manifest import _append, _save_png


def _generate_share(pipe, extra, mine, out, recorded, state, show, on_image, result) -> str | None:
    """Make the images `mine` in batches; the out-of-memory message if the device ran out."""
    import torch
    from tqdm.auto import tqdm

    from ... import cat_stats

    show = show and state.is_main_process
    pipe.set_progress_bar_config(disable=not show, leave=False)
    shard = out / f"manifest.rank{state.process_index}.jsonl"
    where = f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""
    bar = tqdm(total=len(mine), unit="img", desc=f"images{where}", disable=not show)
    height, width, size = recorded["height"], recorded["width"], recorded["batch_size"]
    try:
        for first in range(0, len(mine), size):
            batch = mine[first : first + size]
            tick = time.perf_counter()
            try:
                images = pipe(
                    prompt=[job.prompt for job in batch], height=height, width=width,
                    num_inference_steps=recorded["steps"], guidance_scale=recorded["guidance"],
                    generator=[torch.Generator().manual_seed(job.seed) for job in batch],
                    output_type="pil", **extra,
                ).images  # fmt: skip
            except torch.OutOfMemoryError:
                return _oom_message(size, height, width)
            seconds = time.perf_counter() - tick
            figures = _cat_figures(pipe) if recorded["cat"] else None
            for job, image in zip(batch, images, strict=True):
                _save_png(image, out / job.file)
                record = {
                    "file": job.file, "prompt": job.prompt, "prompt_index": job.prompt_index,
                    "image_index": job.image_index, "seed": job.seed,
                    "rank": state.process_index, "time_s": seconds / len(batch),
                    "batch_time_s": seconds, "batch_images": len(batch), "warm": first > 0,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "settings": recorded, "cat": figures,
                }  # fmt: skip
                _append(shard, record)
                result.generated += 1
                bar.update(1)
                if on_image is not None:
                    on_image(record)
        if recorded["cat"]:
            result.cat_summary = cat_stats(pipe).summary()
    finally:
        bar.close()
    return None


def _cat_figures(pipe) -> dict[str, Any]:
    from ... import cat_stats

    s = cat_stats(pipe)
    return {
        "steps": s.steps,
        "pruned_steps": s.pruned_steps,
        "S": s.budget,
        "L": s.tokens,
        "T": s.text_tokens,
        "computed_fraction": s.computed_fraction,
        "macs_ratio": s.macs_ratio,
        # a budgeted run (--macs): the steps its plan computed, counted from 1
        "computed_steps": s.plan.describe() if s.plan is not None else None,
    }


def _oom_message(batch_size: int, height: int, width: int) -> str:
    return (
        f"out of memory at --batch-size {batch_size}, {height}x{width}: lower "
        f"--batch-size or --size, use --dtype bf16, or load the pipeline yourself with "
        f"pipe.enable_model_cpu_offload() and pass it to "
        f"catpatch.cli.generate.run(settings, pipe=pipe); re-run the same command to resume"
    )
