"""What every `catpatch` command shares: one-line errors with exit status 2 (`CommandError`,
`Parser`), help that shows each option's default (`HelpFormatter`), the built-in model names
(`--model toy`), the device, output-folder and image-size checks, the `CATConfig` of a command
line, progress bars only on a terminal, and one-line warnings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_HELP = (
    "'toy' or 'scenes' (small SD3 pipelines shipped in catpatch, offline), a folder or a hub id"
)
PROGRESS_HELP = "no progress bars (there are none either when stderr is not a terminal)"
EXIT_USAGE = 2  # bad input, as argparse exits
# Pixels per side that --size accepts: 4x the 1024 px these families are trained at; beyond it
# a single attention map no longer fits a GPU, so a larger value is a typo, not a run.
MAX_SIDE = 4096


class CommandError(RuntimeError):
    """Bad input to a command: `catpatch` prints one line that names the fix and exits with
    status 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Help that ends every option with its default: `(default: 28)`; an option whose default
    is None says in its own words what it defaults to, and a flag reads `(default: off)`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)"  # a flag: not given unless you give it
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, `catpatch bench: error: ... (see
    `catpatch bench --help`)`, with exit status 2; its subcommands are Parsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def fail(command: str, error: BaseException | str) -> int:
    """Print the one-line error of `command` on stderr; the exit status (2)."""
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"catpatch {command}: error: {text}", file=sys.stderr)
    return EXIT_USAGE


def warn(command: str, message: str) -> None:
    """One warning line on stderr."""
    print(f"catpatch {command}: warning: {message}", file=sys.stderr)


def warn_if_nothing_pruned(command: str, steps: int | None, warmup_steps: int) -> bool:
    """Warn (one line) when a run of `steps` steps is no longer than the warm-up: no policy
    saves anything. True if it warned."""
    if steps is None or steps > warmup_steps:
        return False
    warn(
        command,
        f"--steps {steps} is not more than --warmup-steps {warmup_steps}: every step runs the "
        f"whole model, so catpatch saves nothing in this run (raise --steps or lower "
        f"--warmup-steps)",
    )
    return True


def plural(count: int, noun: str) -> str:
    """'1 image', '4 images'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def show_progress(wanted: bool = True) -> bool:
    """Progress bars only when wanted and stderr is a terminal: piped into a file or another
    program, a bar's carriage returns and escape codes are noise."""
    return wanted and sys.stderr.isatty()


def looks_like_path(name: str) -> bool:
    """True for what can only be a file or folder, never a hub id (`owner/name`)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") != 1


def check_output_folder(path: str | Path, option: str = "--out") -> None:
    """CommandError unless the folder `path` exists or can be created (a file in its way, a
    missing or read-only place); leaves behind nothing it created to find out."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option} {path}: is a file, not a folder; pass a folder path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise CommandError(
                f"{option} {path}: {parent} is a file, not a folder; pass a folder path"
            )
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".catpatch-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise CommandError(
            f"{option} {path}: cannot write there ({why}); pass a folder you can write to"
        ) from None
    finally:
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


def check_image_size(
    config: Any,
    height: int,
    width: int,
    num_clusters: int | None = None,
    vae_scale: int = 8,
    error: type[CommandError] = CommandError,
) -> int:
    """`error` unless HxW pixels fit a transformer `config` (a dict or a config object):
    at most `MAX_SIDE` per side, positive multiples of VAE scale x patch size, within the
    position embedding, and at least `num_clusters` image tokens. Returns the number of image
    tokens."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    # FLUX's pipelines pack 2x2 latents per token (its transformer's patch_size is 1)
    flux = get("num_single_layers") is not None
    patch = 2 if flux else int(get("patch_size") or 2)
    unit = vae_scale * patch
    if max(height, width) > MAX_SIDE:
        fit = "x".join(str(min(v, MAX_SIDE) // unit * unit) for v in (height, width))
        raise error(
            f"--size {height}x{width}: at most {MAX_SIDE} pixels per side (SD3 and FLUX are made "
            f"for about 1024; {MAX_SIDE}x{MAX_SIDE} is already {(MAX_SIDE // unit) ** 2} image "
            f"tokens), e.g. --size {fit}"
        )
    if height <= 0 or width <= 0 or height % unit or width % unit:
        fit = "x".join(str(max(unit, round(v / unit) * unit)) for v in (height, width))
        raise error(
            f"--size {height}x{width}: height and width must be positive multiples of {unit} "
            f"for {'FLUX' if flux else 'SD3'} (latents are 1/{vae_scale} of the image, tokens "
            f"are {patch}x{patch} latents), e.g. --size {fit}"
        )
    limit = get("pos_embed_max_size")
    if limit and max(height, width) > limit * unit:
        raise error(
            f"--size {height}x{width}: this transformer's position embedding allows at most "
            f"{limit * unit} pixels per side, e.g. --size {limit * unit}x{limit * unit}"
        )
    tokens = (height // unit) * (width // unit)
    if num_clusters is not None and num_clusters > tokens:
        raise error(
            f"--num-clusters {num_clusters} exceeds the {plural(tokens, 'image token')} at "
            f"{height}x{width}: lower --num-clusters or raise --size"
        )
    return tokens


def is_builtin(model: str | None) -> bool:
    """Whether `model` names a pipeline shipped in catpatch (`catpatch.trained.builtin_models`)."""
    from ..trained import builtin_models

    return model in builtin_models()


def resolve_model(model: str) -> str:
    """The folder or hub id of `model`: a built-in name (`toy`, `scenes`) becomes its shipped
    folder."""
    if is_builtin(model):
        from ..trained import builtin_models

        return str(builtin_models()[model].weights_dir())
    return model


def check_device(device: str | None, option: str = "--device") -> None:
    """CommandError unless torch can use `device` (None: automatic, always fine)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CommandError(f"{option} {device}: not a device name; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is a CPU-only build"
            if torch.version.cuda is None
            else "no CUDA GPU is visible"
        )
        raise CommandError(
            f"{option} {device}: {why}; use --device cpu, or install a CUDA build of torch "
            f"(see the README, Install)"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"{option} {device}: MPS is not available here; use --device cpu")


_FIELD = re.compile(r"CATConfig\.(\w+)=(.*?): (.*)", re.DOTALL)


def cat_config(**fields: Any):
    """`CATConfig(**fields)`; CommandError naming the command-line option if a value is bad."""
    from ..config import CATConfig

    try:
        return CATConfig(**fields)
    except ValueError as err:
        match = _FIELD.match(str(err))
        if match is None:
            raise CommandError(str(err)) from None
        name, value, why = match.groups()
        raise CommandError(f"--{name.replace('_', '-')} {value}: {why}") from None


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


positive_int.__name__ = "int"  # argparse says "invalid int value: 'x'"
nonnegative_int.__name__ = "int"


@contextlib.contextmanager
def output_folder(path: str | Path) -> Iterator[Path]:
    """Create `path` (and missing parents) for a run; if the run fails before writing anything
    into it, remove what was created, so that a failed run leaves no empty folders behind."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in created:  # innermost first; stop at the first one holding anything
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
        raise


def add_cat_options(p: argparse.ArgumentParser) -> None:
    """--selection, --keep-ratio, --warmup-steps, --num-clusters and the budget (--macs,
    --forecast, --calibration): the settings every command takes; call `resolve_cat_options`
    on the parsed arguments. The manual knobs default to None here (their help names the
    default), so that one given next to --macs can be told from its default."""
    from .. import policies
    from ..config import CATConfig

    defaults = CATConfig()
    p.add_argument(
        "--selection", default=None, choices=list(policies.names()),
        help="what pruned steps compute: 'cat' (CAT's token selection), its ablations, 'step' "
        "(whole steps skipped at CAT's MACs; the manual default, closest to unpatched in the "
        "0.3.0 study) "
        "or 'cat+reuse' (default: none, the budget --macs; with --keep-ratio or --warmup-steps: "
        "step; not with --macs)",
    )  # fmt: skip
    p.add_argument(
        "--keep-ratio", type=float, default=None,
        help="alpha: the share of the image tokens a pruned step recomputes (cat, ...); with "
        f"'step', the MACs of the run are those of that pruning (default: "
        f"{defaults.keep_ratio}; not with --macs)",
    )  # fmt: skip
    p.add_argument(
        "--warmup-steps", type=int, default=None,
        help="t0: full steps before the policy computes less (default: "
        f"{defaults.warmup_steps}; not with --macs)",
    )  # fmt: skip
    p.add_argument(
        "--num-clusters", type=int, default=None,
        help=f"spatial clusters of CAT's token selection (default: {defaults.num_clusters}; "
        f"only with a clustering --selection: {', '.join(cluster_selections())})",
    )  # fmt: skip
    from .budget import add_budget_options

    add_budget_options(p)


def cluster_selections() -> tuple[str, ...]:
    """The selections whose token policy clusters the image (CAT's and its variants)."""
    from .. import policies
    from ..policies.cat import CatPolicy

    return tuple(
        name
        for name, (token, _) in policies.REGISTRY.items()
        if token is not None and issubclass(token, CatPolicy)
    )


def resolve_cat_options(args: argparse.Namespace) -> None:
    """Fill in the options `add_cat_options` leaves None (to tell a value given from the
    default) and check that they go together: CommandError for --num-clusters with a selection
    that has no clusters (it would silently do nothing), for --keep-ratio, --warmup-steps,
    --selection or --num-clusters next to --macs (the budget plans them), and for --forecast
    or --calibration without --macs."""
    from .. import policies
    from ..config import CATConfig
    from .budget import check_budget_options

    defaults = CATConfig()
    manual = (args.keep_ratio, args.warmup_steps, args.selection, args.num_clusters)
    patches = getattr(args, "cat", True)  # generate --no-cat: the unpatched baseline
    if args.macs is None and defaults.budgeted and patches and all(v is None for v in manual):
        args.macs = defaults.macs  # the library's default is a budget: so is the command's
    check_budget_options(args)
    if args.macs is not None:
        given = [
            (option, value)
            for option, value in (
                ("--keep-ratio", args.keep_ratio),
                ("--warmup-steps", args.warmup_steps),
                ("--selection", args.selection),
                ("--num-clusters", args.num_clusters),
            )
            if value is not None
        ]
        if given:
            option, value = given[0]
            raise CommandError(
                f"{option} {value} with --macs {args.macs:g}: the budget plans the steps itself; "
                f"drop {' and '.join(o for o, _ in given)}, or drop --macs to set them by hand"
            )
    args.selection = defaults.selection if args.selection is None else args.selection
    args.keep_ratio = defaults.keep_ratio if args.keep_ratio is None else args.keep_ratio
    args.warmup_steps = defaults.warmup_steps if args.warmup_steps is None else args.warmup_steps
    if args.num_clusters is None:
        args.num_clusters = defaults.num_clusters
        return
    if args.selection not in cluster_selections():
        raise CommandError(
            f"--num-clusters {args.num_clusters}: --selection {args.selection} "
            f"({policies.label(args.selection)}) makes no clusters, so it would do nothing; "
            f"drop --num-clusters, or add --selection cat for CAT's token pruning"
        )
