"""A model's calibration for the planner: how its outputs relate from step to step.

One unpatched run on a few captions at a fine step count records the transformer's output at
every step; what the planner needs of it is the Gram matrix of those outputs (inner products
between every pair of steps, summed over captions, tokens and channels), kept per CFG half so
that any guidance scale can be served: with v = u + g·(c - u),
<v_a, v_b> = (1-g)²<u_a,u_b> + g(1-g)(<u_a,c_b> + <c_a,u_b>) + g²<c_a,c_b>.
The matrices are indexed by σ (the flow-matching noise level of each step), so one calibration
serves any step count, shift or img2img strength: the run's steps are interpolated in σ.

A calibration is a few hundred KiB; `save` writes it as a safetensors file beside the model
(`CALIBRATION_FILE` in a pipeline folder is found by `apply_cat`), `load` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_FILE = "catpatch_calibration.safetensors"
MAX_TOKENS = 1024  # tokens per output sampled into the Gram matrices (fixed seed)


@dataclass
class Calibration:
    """Gram matrices of a model's outputs on a σ grid (K decreasing σ of the calibration run).

    `cond` (K, K): conditional outputs (all rows when the model runs without CFG);
    `uncond`, `cross` (K, K) or None: unconditional outputs and <u_a, c_b>, under CFG."""

    sigmas: np.ndarray
    cond: np.ndarray
    uncond: np.ndarray | None = None
    cross: np.ndarray | None = None
    captions: int = 0
    model: str = ""

    def guided(self, guidance: float | None) -> np.ndarray:
        """The Gram matrix of the guided output u + g·(c - u) on the calibration grid."""
        if self.uncond is None or guidance is None:
            return self.cond
        g = float(guidance)
        mixed = self.cross + self.cross.T
        return (1 - g) ** 2 * self.uncond + g * (1 - g) * mixed + g**2 * self.cond

    def gram(self, sigmas: np.ndarray, guidance: float | None) -> np.ndarray:
        """The Gram matrix (N, N) of the guided outputs at a run's steps of noise levels
        `sigmas` (N + 1 values, the last one the end of the run), interpolated in σ."""
        interp = interpolation(self.sigmas, np.asarray(sigmas, np.float64)[:-1])
        return interp @ self.guided(guidance) @ interp.T

    # -- files
    def save(self, path: str | Path) -> Path:
        import torch
        from safetensors.torch import save_file

        path = calibration_file(path)
        tensors = {"sigmas": self.sigmas, "cond": self.cond}
        if self.uncond is not None:
            tensors |= {"uncond": self.uncond, "cross": self.cross}
        meta = {"captions": str(self.captions), "model": self.model, "format": "1"}
        save_file(
            {k: torch.from_numpy(np.ascontiguousarray(v, np.float64)) for k, v in tensors.items()},
            str(path),
            metadata=meta,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        from safetensors import safe_open

        path = calibration_file(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no calibration there; make one with catpatch.calibrate(pipe, "
                f"prompts).save(path) (see README, 'Budget')"
            )
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return cls(
            sigmas=tensors["sigmas"],
            cond=tensors["cond"],
            uncond=tensors.get("uncond"),
            cross=tensors.get("cross"),
            captions=int(meta.get("captions", 0)),
            model=meta.get("model", ""),
        )

    def __repr__(self) -> str:
        cfg = "CFG halves" if self.uncond is not None else "no CFG"
        return (
            f"Calibration({self.model or 'model'}: {len(self.sigmas)} steps, "
            f"{self.captions} captions, {cfg})"
        )


def calibration_file(path: str | Path) -> Path:
    """The calibration file that `path` names: itself, or `CALIBRATION_FILE` in a folder."""
    path = Path(path)
    return path / CALIBRATION_FILE if path.is_dir() else path


def interpolation(grid: np.ndarray, at: np.ndarray, points: int = 4) -> np.ndarray:
    """(len(at), len(grid)) weights of interpolation in σ on a decreasing `grid`: the
    polynomial through the `points` nearest grid values (cubic by default: the forecasts the
    planner fits span a few steps, where linear interpolation's own error would be of their
    size); values outside the grid take the nearest end."""
    order = np.argsort(grid)
    ascending = grid[order]
    size = min(points, len(grid))
    weights = np.zeros((len(at), len(grid)))
    for i, s in enumerate(np.clip(at, ascending[0], ascending[-1])):
        k = int(np.searchsorted(ascending, s))
        if k < len(grid) and ascending[k] == s:
            weights[i, order[k]] = 1.0
            continue
        start = min(max(k - size // 2, 0), len(grid) - size)
        nodes = ascending[start : start + size]
        for j, node in enumerate(nodes):
            others = np.delete(nodes, j)
            weights[i, order[start + j]] = np.prod((s - others) / (node - others))
    return weights


def calibrate(
    pipe: Any,
    prompts: list[str],
    num_inference_steps: int = 100,
    seeds: list[int] | None = None,
    batch_size: int = 4,
    **call_kwargs: Any,
) -> Calibration:
    """Measure `pipe`'s calibration: unpatched generations of `prompts` at
    `num_inference_steps` (a fine σ grid), recording the transformer's output at every step.
    `call_kwargs` go to the pipeline call (guidance scale, size, ...); the calibration keeps
    the CFG halves apart, so any guidance scale can use it later. Runs with catpatch removed
    for the duration if the pipeline is patched (the outputs must be the model's own)."""
    import torch

    from .patching import apply_cat, get_patch, remove_cat

    patch = get_patch(pipe)
    config = None if patch is None else patch.config
    if patch is not None:
        remove_cat(pipe)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    recorder = _Recorder()
    handle = pipe.transformer.register_forward_hook(recorder.hook)
    try:
        for i in range(0, len(prompts), batch_size):
            part = prompts[i : i + batch_size]
            gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
            recorder.start()
            pipe(
                prompt=part,
                generator=gens,
                num_inference_steps=num_inference_steps,
                output_type="latent",
                **call_kwargs,
            )
            recorder.finish(getattr(pipe, "do_classifier_free_guidance", False))
        sigmas = np.asarray(pipe.scheduler.sigmas[:num_inference_steps].float().cpu(), np.float64)
    finally:
        handle.remove()
        if config is not None:
            apply_cat(pipe, config)
    return recorder.calibration(sigmas, len(prompts), _model_name(pipe))


class _Recorder:
    """Collects the transformer's outputs of one generation, then adds their Gram matrices."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.outputs: list[Any] = []

    def start(self) -> None:
        self.outputs = []

    def hook(self, module, args, output) -> None:
        sample = output[0] if isinstance(output, tuple) else output.sample
        self.outputs.append(sample.detach().float().flatten(1).cpu())

    def finish(self, cfg: bool) -> None:
        import torch

        stack = torch.stack(self.outputs, 1)  # (R, K, D)
        generator = torch.Generator().manual_seed(0)
        width = stack.shape[-1]
        if width > MAX_TOKENS * 64:  # a fixed sample of positions (unbiased up to scale)
            keep = torch.randperm(width, generator=generator)[: MAX_TOKENS * 64]
            stack = stack[..., keep] * (width / keep.numel()) ** 0.5
        halves = {"cond": stack}
        if cfg:
            rows = stack.shape[0] // 2
            halves = {"uncond": stack[:rows], "cond": stack[rows:]}
        for name, part in halves.items():
            self._add(name, torch.einsum("rkd,rld->kl", part.double(), part.double()))
        if cfg:
            u, c = halves["uncond"].double(), halves["cond"].double()
            self._add("cross", torch.einsum("rkd,rld->kl", u, c))
        self.outputs = []

    def _add(self, name: str, gram) -> None:
        value = gram.numpy()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def calibration(self, sigmas: np.ndarray, captions: int, model: str) -> Calibration:
        return Calibration(
            sigmas=sigmas,
            cond=self.sums["cond"],
            uncond=self.sums.get("uncond"),
            cross=self.sums.get("cross"),
            captions=captions,
            model=model,
        )


def _model_name(pipe: Any) -> str:
    name = getattr(getattr(pipe, "config", None), "_name_or_path", "") or ""
    return json.dumps(type(pipe.transformer).__name__)[1:-1] + (f" {name}" if name else "")


def builtin_path() -> Path:
    """The calibration a budgeted run falls back to: the shipped scenes model's."""
    from importlib import resources

    return Path(str(resources.files("catpatch.scenes").joinpath("weights", CALIBRATION_FILE)))


def find(setting: Any, pipe: Any = None, transformer: Any = None) -> Calibration:
    """The calibration of `CATConfig.calibration` = `setting`: itself, the file it names, or
    (None) the file beside the pipeline or transformer, else the built-in one with a warning."""
    import warnings

    if isinstance(setting, Calibration):
        return setting
    if setting is not None:
        return Calibration.load(setting)
    for model in (pipe, transformer):
        folder = getattr(getattr(model, "config", None), "_name_or_path", None)
        for candidate in _beside(folder):
            if candidate.is_file():
                return Calibration.load(candidate)
    warnings.warn(
        "catpatch: this model has no calibration, so the budget is planned from the shipped "
        "scenes model's; measure yours once for better plans: "
        "catpatch.calibrate(pipe, prompts).save(folder) with the pipeline's folder "
        "(see README, 'Budget')",
        stacklevel=3,
    )
    return Calibration.load(builtin_path())


def _beside(folder: Any) -> list[Path]:
    """Where a model loaded from `folder` keeps its calibration: the folder (a pipeline) or
    the folder above it (a transformer in a pipeline's subfolder)."""
    if not folder:
        return []
    path = Path(str(folder)).expanduser()
    return [path / CALIBRATION_FILE, path.parent / CALIBRATION_FILE] if path.is_dir() else []
