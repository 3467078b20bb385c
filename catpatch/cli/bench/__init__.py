"""`catpatch bench`: the denoising loop unpatched vs patched (the default budget, `--macs`,
or the policy `--selection` names), side by side in one process.

Builds an SD3-family, FLUX.1 or PixArt-Σ transformer from a named shape with random weights
(speed does not depend on weight values) or loads a user's transformer, and times whole
denoising loops of the two, alternating, after warm-up, reporting medians, their ratio, the
arithmetic bound of the run (the family's cost model over the steps it ran full, pruned and
skipped), MACs, the memory the caches hold and the selection time per pruned step. A speed-up
above the bound is re-measured once and flagged (`plausible`) if it still is (`..timing`).

Modules: `settings` (what is timed, and what is refused with a one-line fix), `loop` (the
denoising loop), `measure` (`run`: the timing procedure), `report` (`BenchResult`: the table
and JSON), `command` (argparse).
"""

from .command import add_parser, command
from .loop import Loop
from .measure import run
from .report import BenchResult
from .settings import (
    BenchError,
    BenchSettings,
    check_settings,
    default_size,
    is_flux_config,
    load_transformer,
    transformer_config,
)

__all__ = [
    "BenchError",
    "BenchResult",
    "BenchSettings",
    "Loop",
    "add_parser",
    "check_settings",
    "command",
    "default_size",
    "is_flux_config",
    "load_transformer",
    "run",
    "transformer_config",
]
