"""The budget knob on the command line: `--macs`, `--forecast`, `--calibration` and their
checks (`CATConfig(macs=B)`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from .common import _FIELD, CommandError, plural


def add_budget_options(p: argparse.ArgumentParser, what: str = "the run") -> None:
    """--macs, --forecast, --calibration: the budget knob (`CATConfig(macs=B)`)."""
    from ..planner import FORECASTS

    p.add_argument(
        "--macs", type=budget, default=None, metavar="B",
        help=f"the budget: {what}'s transformer MACs at most B (in (0, 1]) of the unpatched "
        "run's; catpatch plans which steps run the model and forecasts the others from the "
        "model's calibration (bound speed-up 1/B; at least 2 steps must fit: B >= 2/--steps). "
        "Replaces --selection, --keep-ratio and --warmup-steps (default: none, the manual knobs)",
    )  # fmt: skip
    p.add_argument(
        "--forecast", default=None, choices=list(FORECASTS),
        help="with --macs: how a skipped step is forecast from the last computed outputs: "
        "'auto' (per step the order 0, 1 or 2 in sigma that the calibration measures closest), "
        "'fit' (weights fitted on the calibration), 'reuse' (the last output again), "
        "'taylor1' / 'taylor2' (extrapolation in sigma) (default: auto)",
    )  # fmt: skip
    p.add_argument(
        "--calibration", default=None, metavar="PATH",
        help="with --macs: the model's calibration file (catpatch.calibrate(pipe, prompts)"
        ".save(PATH)) (default: the one in the pipeline's folder, else the shipped scenes "
        "model's, with a warning)",
    )  # fmt: skip


def budget(text: str) -> float:
    """argparse type of --macs: a number (its range is `CATConfig`'s to check)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be a number in (0, 1], e.g. 0.4 for at most 40% of the MACs"
        ) from None


budget.__name__ = "number"


def budget_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The `CATConfig` fields of --macs, --forecast and --calibration (after
    `resolve_cat_options` or `check_budget_options`); empty without --macs."""
    if args.macs is None:
        return {}
    return {"macs": args.macs, "forecast": args.forecast, "calibration": args.calibration}


def check_budget_options(args: argparse.Namespace) -> None:
    """--forecast and --calibration only with --macs (fills in --forecast's default); a
    --calibration file that is missing or not a calibration: CommandError naming the fix."""
    from ..config import CATConfig

    if args.macs is None:
        for option, value in (("--forecast", args.forecast), ("--calibration", args.calibration)):
            if value is not None:
                raise CommandError(
                    f"{option} {value}: only with --macs (the budget it plans for); add --macs "
                    f"B, e.g. --macs 0.4, or drop {option}"
                )
        return
    args.forecast = CATConfig().forecast if args.forecast is None else args.forecast
    if args.calibration is not None:
        check_calibration(args.calibration)


def check_calibration(path: str) -> None:
    """CommandError unless `path` is a calibration file (or a folder holding one)."""
    from ..calibration import Calibration, calibration_file

    file = calibration_file(Path(path).expanduser())
    if not file.is_file():
        raise CommandError(
            f"--calibration {path}: no such file; pass a file written by catpatch.calibrate(pipe, "
            f"prompts).save(PATH), or drop --calibration to use the model's own"
        )
    try:
        Calibration.load(file)
    except Exception as err:  # safetensors' errors have no common base
        raise CommandError(
            f"--calibration {path}: not a catpatch calibration ({type(err).__name__}); pass a "
            f"file written by catpatch.calibrate(pipe, prompts).save(PATH)"
        ) from None


def check_budget_steps(
    macs: float | None, steps: int | None, more: str = ", or more --steps"
) -> None:
    """CommandError when the budget `macs` leaves fewer computed steps than the planner needs
    at `steps` steps (nothing to check without a budget or a step count); `more`: the other
    fix, if the command has one."""
    from .. import planner

    if macs is None or steps is None or not 0 < macs <= 1:  # the range: CATConfig's to say
        return
    count = planner.computed_count(macs, steps)
    if count >= planner.MIN_COMPUTED:
        return
    from ..config import DEFAULT_MACS

    need = planner.min_budget(steps)
    default = " (the default budget)" if macs == DEFAULT_MACS else ""
    raise CommandError(
        f"--macs {macs:g}{default} at {steps} steps leaves {plural(count, 'computed step')}; "
        f"the planner needs at least {planner.MIN_COMPUTED} (the first step and one to forecast "
        f"from): use --macs {need:g} or more{more}"
    )


def budget_config_error(err: ValueError) -> CommandError | None:
    """The CommandError, in command-line words, of a `CATConfig` ValueError raised when a run
    starts (e.g. the planner's: too few steps fit the budget); None for any other error."""
    match = _FIELD.match(str(err))
    if match is None:
        return None
    name, value, why = match.groups()
    why = re.sub(
        r"use macs >= ([\d.]+) or more steps",
        lambda m: f"use --macs {float(m.group(1)):g} or more, or more --steps",
        why,
    )
    return CommandError(f"--{name.replace('_', '-')} {value}: {why}")
