"""`catpatch generate`: images of a prompt list, patched or not; resumable, data-parallel.

    catpatch generate --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --prompts-file prompts.txt --out out/fast                # step reuse (α 0.3, t0 8)
    catpatch generate ... --selection cat --out out/cat          # CAT's token pruning
    catpatch generate ... --macs 0.4 --out out/budget            # at most 40% of the MACs
    catpatch generate ... --no-cat --out out/base                # same seeds and file names
    accelerate launch --num_processes 8 -m catpatch generate ...  # one share per GPU

Image j of prompt i is `{i:05d}_{j:03d}.png`, made from the CPU generator seeded with
`seed + 1000*i + j`, so two runs over the same prompts pair up by file name (`catpatch eval`).
Each PNG is written atomically (temp file + rename); only then is its line appended to the
manifest (prompt, seed, settings, time and the CAT figures of its batch). A re-run into the same
`--out` makes only the images that are missing. Under `accelerate launch` or `torchrun` every
process takes a contiguous share of the missing images and appends to its own shard
`manifest.rank{r}.jsonl`; at the end the main process merges all shards into `manifest.jsonl`
(one line per file name, in prompt order) and reports any image that is still missing.

Modules: `settings` (what a run asks for and did), `prompts` (the prompt file and the images it
asks for), `manifest` (the resumable record), `pipeline` (loading and preparing the pipeline),
`loop` (one process's images), `parallel` (`run`, split over processes), `command` (argparse).
"""

from .command import add_arguments, add_parser, main, parse_size
from .manifest import GENERATION_KEYS, MANIFEST, SHARD_GLOB, merge_manifest, read_records
from .parallel import run
from .pipeline import check_size, first_line, load_pipeline
from .prompts import PROMPT_COLUMNS, SEED_STRIDE, Job, jobs_for, read_prompts
from .settings import GenerateError, GenerateResult, GenerateSettings

__all__ = [
    "GENERATION_KEYS",
    "MANIFEST",
    "PROMPT_COLUMNS",
    "SEED_STRIDE",
    "SHARD_GLOB",
    "GenerateError",
    "GenerateResult",
    "GenerateSettings",
    "Job",
    "add_arguments",
    "add_parser",
    "check_size",
    "first_line",
    "jobs_for",
    "load_pipeline",
    "main",
    "merge_manifest",
    "parse_size",
    "read_prompts",
    "read_records",
    "run",
]
