"""`catpatch bench`: the denoising loop unpatched vs CAT-patched, side by side in one process.

Builds an SD3-family, FLUX.1 or PixArt-Σ transformer from a named shape with random weights
(speed does not depend on weight values) or loads a user's transformer, and times whole
denoising loops of the two, alternating, after warm-up, reporting medians, their ratio, the
arithmetic bound of the run (the family's cost model over the steps it ran full, pruned and
skipped), MACs, the memory the caches hold and the selection time per pruned step. A speed-up
above the bound is re-measured once and flagged (`plausible`) if it still is (`timing.py`).
`check_settings` rejects what cannot be timed (sizes that are not multiples of 16, loops no
longer than the warm-up, ...) with one line
that names the fix; a hub id is looked up once, so an offline machine fails in seconds.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import __version__
from ..config import CATConfig
from ..dtypes import torch_dtype
from ..families import family_of
from ..patching import apply_cat, cat_generation, get_patch
from ..stats import collect
from .common import (
    CommandError,
    cat_config,
    check_device,
    check_image_size,
    is_builtin,
    looks_like_path,
    resolve_model,
)
from .generate.pipeline import first_line
from .timing import bound_note, busy_note, impossible, load_average, runs_label


@dataclass
class BenchSettings:
    shape: str = "cpu-256x8"
    model: str | None = None  # "toy", a pipeline or transformer folder / hub id, not a shape
    height: int = 512
    width: int = 512
    steps: int = 28
    batch: int = 1
    cfg: bool = True
    text_tokens: int | None = None  # None: the family's default (SD3 333, FLUX 512, PixArt 300)
    keep_ratio: float = 0.3
    warmup_steps: int = 8
    num_clusters: int = 20
    selection: str = CATConfig.selection  # the library's default policy
    dtype: str = "fp32"
    device: str = "cpu"
    compile: str = "none"  # none | default | reduce-overhead | max-autotune
    lean: bool = True  # CATConfig.lean
    repeats: int = 3
    seed: int = 0


@dataclass
class BenchResult:
    settings: dict[str, Any]
    device_name: str
    tokens: int
    budget: int
    rows: int
    unpatched_s: list[float] = field(default_factory=list)
    patched_s: list[float] = field(default_factory=list)
    eager_unpatched_s: list[float] | None = None  # compiled runs: the uncompiled baseline
    speedup: float = 0.0
    speedup_vs_eager: float | None = None
    bound: float = 0.0
    fraction_of_bound: float = 0.0
    macs_ratio: float = 0.0
    cache_bytes: int = 0
    peak_extra_bytes: int | None = None
    full_step_ms: float = 0.0
    pruned_step_ms: float = 0.0
    selection_ms: float = 0.0
    selection_share: float = 0.0
    plausible: bool = True  # the speed-up is within the arithmetic bound (+5%)
    remeasured: bool = False  # it was not at first: more runs were timed
    steps_full: int = 0  # the CAT loop's steps by mode: full (and recording), pruned, skipped
    steps_pruned: int = 0
    steps_skipped: int = 0
    catpatch_version: str = __version__
    load_average_before: float | None = None  # 1-minute load average when timing began
    busy: str = ""  # the warning when that load already filled every core

    def table(self) -> str:
        s = self.settings
        runs = runs_label(len(self.patched_s))
        rows = [
            ("device", self.device_name),
            ("model", s["model"] or f"{s['shape']} (random weights)"),
            (
                "run",
                f"{s['height']}x{s['width']} ({self.tokens} tokens), {s['steps']} steps, "
                f"batch {s['batch']}{' + CFG' if s['cfg'] else ''} ({self.rows} rows), "
                f"{s['dtype']}, compile={s['compile']}",
            ),
            (
                "CAT",
                f"keep_ratio {s['keep_ratio']} (S={self.budget}), warmup {s['warmup_steps']}, "
                f"{s['num_clusters']} clusters, selection={s['selection']}",
            ),
            ("catpatch", self.catpatch_version),
            (f"loop unpatched ({runs})", f"{statistics.median(self.unpatched_s) * 1e3:.1f} ms"),
            (f"loop CAT ({runs})", f"{statistics.median(self.patched_s) * 1e3:.1f} ms"),
            (
                "speed-up",
                f"{self.speedup:.2f}x"
                + ("" if self.plausible else "  IMPOSSIBLE: above the bound, see the warning"),
            ),
            *(
                [("speed-up vs eager unpatched", f"{self.speedup_vs_eager:.2f}x")]
                if self.speedup_vs_eager
                else []
            ),
            ("arithmetic bound", f"{self.bound:.2f}x  (reached {self.fraction_of_bound:.0%})"),
            (
                "steps full / pruned / skipped",
                f"{self.steps_full} / {self.steps_pruned} / {self.steps_skipped}",
            ),
            ("MACs ratio", f"{self.macs_ratio:.3f}"),
            ("full / pruned step", f"{self.full_step_ms:.1f} / {self.pruned_step_ms:.1f} ms"),
            (
                "selection per pruned step",
                f"{self.selection_ms:.2f} ms ({self.selection_share:.1%} of the step)",
            ),
            ("cache memory", f"{self.cache_bytes / 2**20:.1f} MiB"),
        ]
        if self.peak_extra_bytes is not None:
            rows.append(("extra peak memory", f"{self.peak_extra_bytes / 2**20:.1f} MiB"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def note(self) -> str:
        """The warning for an impossible speed-up; empty if the timing is plausible."""
        return bound_note(self.speedup, self.bound)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class BenchError(CommandError):
    """Bad settings for `catpatch bench`; the message names the fix (exit status 2)."""


def transformer_config(shape: str, model: str | None) -> dict[str, Any]:
    """The transformer config of a named shape, or of `model` (read, not loaded)."""
    if model is None:
        from ..models.shapes import transformer_config as shape_config

        return shape_config(shape)
    from diffusers import SD3Transformer2DModel

    path = resolve_model(model)
    _check_reachable(model, path)
    for kwargs in ({"subfolder": "transformer"}, {}):
        try:
            with warnings.catch_warnings():  # huggingface_hub's deprecation notices
                warnings.simplefilter("ignore")
                # reads any transformer's config.json (its "_class_name" names the class)
                return dict(SD3Transformer2DModel.load_config(path, **kwargs))
        except (OSError, ValueError) as err:
            reason = first_line(err)
    raise BenchError(
        f"--model {model}: no SD3 transformer config there, nor a FLUX or PixArt-Σ one "
        f"({reason}); pass 'toy', a pipeline or transformer folder, or a hub id (offline: a "
        f"local folder)"
    )


def _check_reachable(model: str, path: str) -> None:
    """BenchError at once for a folder that is not there or a hub id that cannot be looked up
    (no network, no such repository), instead of huggingface_hub's minute and a half of
    retries; a hub model already in the local cache passes offline."""
    import os

    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if is_builtin(model) or os.path.exists(os.path.expanduser(path)):
        return
    if looks_like_path(path):
        raise BenchError(
            f"--model {model}: no such folder; pass 'toy', a pipeline or transformer folder, "
            f"or a hub id (owner/name)"
        )
    for name in ("transformer/config.json", "config.json"):
        if isinstance(try_to_load_from_cache(path, name), str):
            return  # cached: loads offline
    if constants.HF_HUB_OFFLINE:
        raise BenchError(
            f"--model {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it first or pass a local folder"
        )
    try:
        model_info(path, timeout=10)
    except Exception as err:  # network errors come from httpx, hub errors from huggingface_hub
        reason = first_line(err)
        if "not found" in reason.lower() or "404" in reason or "401" in reason:
            raise BenchError(
                f"--model {model}: no such model on the Hugging Face hub (or it is gated: "
                f"`hf auth login`); pass 'toy', a local folder or a hub id (owner/name)"
            ) from None
        raise BenchError(
            f"--model {model}: cannot reach the Hugging Face hub ({reason}); offline, pass a "
            f"local folder or 'toy'"
        ) from None


def is_flux_config(config: dict[str, Any]) -> bool:
    """Whether a transformer config is FLUX's (single-stream blocks) rather than SD3's."""
    return config.get("_class_name") == "FluxTransformer2DModel" or "num_single_layers" in config


def default_size(shape: str, model: str | None) -> tuple[int, int]:
    """512x512 for a named shape; the model's sample size x 8 (its native size) for a model."""
    if model is None:
        return 512, 512
    try:
        side = int(transformer_config(shape, model).get("sample_size") or 64) * 8
    except BenchError:
        return 512, 512  # check_settings reports the model
    return side, side


def check_settings(settings: BenchSettings, device_given: bool = True) -> None:
    """BenchError for settings that cannot be timed, before anything is built or loaded."""
    if device_given:
        check_device(settings.device)
    config = transformer_config(settings.shape, settings.model)
    cat_config(
        keep_ratio=settings.keep_ratio, warmup_steps=settings.warmup_steps,
        num_clusters=settings.num_clusters, selection=settings.selection,
    )  # fmt: skip
    check_image_size(
        config, settings.height, settings.width, settings.num_clusters, error=BenchError
    )
    if settings.steps <= settings.warmup_steps:
        raise BenchError(
            f"--steps {settings.steps} must be more than --warmup-steps {settings.warmup_steps}:"
            f" a loop that short prunes nothing, so there is nothing to compare"
        )
    for name in ("batch", "text_tokens", "repeats"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_transformer(settings: BenchSettings):
    """The transformer to time: a named shape with random weights, or a user's model."""
    from ..models.shapes import build_transformer

    dtype = torch_dtype(settings.dtype)
    if settings.model is None:
        # built in the bench dtype: SD3.5-large in fp32 would need twice the memory first
        model = build_transformer(
            settings.shape, seed=settings.seed, device=settings.device, dtype=dtype
        )
    else:
        import diffusers

        config = transformer_config(settings.shape, settings.model)
        default = "FluxTransformer2DModel" if is_flux_config(config) else "SD3Transformer2DModel"
        cls = getattr(diffusers, config.get("_class_name") or default)
        path = resolve_model(settings.model)  # "toy": the pipeline shipped in catpatch
        try:
            model = cls.from_pretrained(path, subfolder="transformer")
        except (OSError, ValueError):
            model = cls.from_pretrained(path)
    if model.dtype != dtype:
        model = model.to(dtype=dtype)
    return model.to(device=settings.device).eval()


class Loop:
    """A denoising loop (CFG) around one transformer, with its family's scheduler: flow-matching
    Euler for SD3 and FLUX, DPM-Solver++ for PixArt-Σ. FLUX: packed latents and position ids as
    its pipelines pass them; CFG is true CFG, two calls of B rows per step (conditional, then
    unconditional), as `FluxPipeline` makes them."""

    def __init__(self, transformer, settings: BenchSettings, eager: bool = False):
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

        adapter = family_of(transformer).adapter_class()
        self.eager = eager  # run a transformer compiled in place without its compiled code
        self.transformer = transformer
        self.settings = settings
        cfg = transformer.config
        device, dtype = torch.device(settings.device), torch_dtype(settings.dtype)
        gen = torch.Generator().manual_seed(settings.seed)
        batch = settings.batch
        # true CFG as separate calls of B rows (FLUX) rather than 2B rows of one call
        self.flux = not adapter.batched_cfg
        rows = 2 * batch if settings.cfg and not self.flux else batch
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.device = device
        self.rows = rows
        self.forward = transformer
        if self.flux:
            h, w = settings.height, settings.width
            text = settings.text_tokens or adapter.text_tokens
            calls = [
                adapter.example_inputs(cfg, batch, h, w, text, device, dtype, gen)
                for _ in range(2 if settings.cfg else 1)
            ]
            for call in calls:
                del call["timestep"]  # the loop's
            self.latents = calls[0].pop("hidden_states")
            for extra in calls[1:]:
                extra.pop("hidden_states")
            self.calls = calls
            return
        latent = (batch, cfg.in_channels, settings.height // 8, settings.width // 8)
        self.latents = torch.randn(latent, generator=gen).to(device, dtype)
        text = settings.text_tokens or adapter.text_tokens
        self.conditioning = adapter.example_conditioning(cfg, rows, text, device, dtype, gen)
        if family_of(transformer).name == "PixArt-Σ":
            self.scheduler = DPMSolverMultistepScheduler()

    def __call__(self) -> torch.Tensor:
        modules = self.transformer.modules() if self.eager else ()
        compiled = {m: vars(m).pop("_compiled_call_impl") for m in modules if _compiled(m)}
        try:
            return self._denoise()
        finally:
            for module, call in compiled.items():
                module._compiled_call_impl = call

    def _denoise(self) -> torch.Tensor:
        if self.flux:
            return self._denoise_flux()
        s = self.settings
        self.scheduler.set_timesteps(s.steps, device=self.device)
        latents = self.latents.clone()
        patch = get_patch(self.transformer)
        scope = cat_generation(self.transformer, s.steps, cfg=s.cfg) if patch else _nothing()
        with torch.no_grad(), scope:
            for t in self.scheduler.timesteps:
                x = torch.cat([latents, latents]) if s.cfg else latents
                out = self.forward(
                    hidden_states=x, timestep=t.expand(self.rows), return_dict=False,
                    **self.conditioning,
                )[0]  # fmt: skip
                if out.shape[1] == 2 * latents.shape[1]:  # learned sigma: keep the noise
                    out = out.chunk(2, dim=1)[0]
                if s.cfg:
                    uncond, cond = out.chunk(2)
                    out = uncond + 7.0 * (cond - uncond)
                latents = self.scheduler.step(out, t, latents, return_dict=False)[0]
        return latents

    def _denoise_flux(self) -> torch.Tensor:
        s = self.settings
        self.scheduler.set_timesteps(s.steps, device=self.device)
        latents = self.latents.clone()
        patch = get_patch(self.transformer)
        calls = len(self.calls)
        scope = (
            cat_generation(self.transformer, s.steps, calls_per_step=calls) if patch else _nothing()
        )
        with torch.no_grad(), scope:
            for t in self.scheduler.timesteps:
                sigma = (t / 1000).expand(self.rows).to(latents.dtype)
                outs = [
                    self.forward(hidden_states=latents, timestep=sigma, return_dict=False, **call)[
                        0
                    ]
                    for call in self.calls
                ]
                out = outs[0] if calls == 1 else outs[1] + 4.0 * (outs[0] - outs[1])
                latents = self.scheduler.step(out, t, latents, return_dict=False)[0]
        return latents


def _compiled(module) -> bool:
    return "_compiled_call_impl" in vars(module)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _step_times(loop: Loop) -> tuple[float, float]:
    """Median full-step and pruned-step times (ms) from one run with a sync around every step
    (instrumented, so not part of the timed loops)."""
    device, state = loop.device, get_patch(loop.transformer).state
    modes: list[tuple[str, float]] = []
    forward = loop.forward

    def timed_forward(**kwargs):
        _sync(device)
        start = time.perf_counter()
        out = forward(**kwargs)
        _sync(device)
        modes.append((state.log.steps[-1].mode.value, time.perf_counter() - start))
        return out

    loop.forward = timed_forward
    try:
        loop()
    finally:
        loop.forward = forward
    return _median_ms([t for m, t in modes if m in ("full", "reference", "record")]), _median_ms(
        [t for m, t in modes if m == "pruned"]
    )


def _selection_time(loop: Loop, repeats: int = 20) -> float:
    """Median time (ms) of one per-step selection (eager), on the state a run leaves behind."""
    device, state = loop.device, get_patch(loop.transformer).state
    persistent, state.persistent = state.persistent, True  # keep the last step's state
    try:
        loop()
        output = state.drift(state.schedule.driver_rows(state.caches.previous))
        select = lambda: state.tokens.next(output, state.chosen)  # noqa: E731
        times = [_timed(select, device) for _ in range(repeats)]
    finally:
        state.persistent = persistent
        if not persistent:
            state.release()
    return _median_ms(times)


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else 0.0


def run(settings: BenchSettings) -> BenchResult:
    """Time the unpatched and the CAT-patched loop, alternating; see the module docstring."""
    load = load_average()  # before this run adds its own
    device = torch.device(settings.device)
    config = CATConfig(
        keep_ratio=settings.keep_ratio,
        warmup_steps=settings.warmup_steps,
        num_clusters=settings.num_clusters,
        selection=settings.selection,
        lean=settings.lean,
    )
    base = load_transformer(settings)
    patched = copy.deepcopy(base)
    if settings.compile != "none":
        # The same compile settings on both sides: regional (per block) compilation, CAT's
        # (CATConfig.compile, with persistent buffers) and each block of the baseline in place.
        config = config.replace(compile=settings.compile)
        mode = None if settings.compile == "default" else settings.compile
        for block in (*base.transformer_blocks, *getattr(base, "single_transformer_blocks", ())):
            block.compile(mode=mode, dynamic=False)
    apply_cat(patched, config)
    loops = {"unpatched": Loop(base, settings), "patched": Loop(patched, settings)}
    if settings.compile != "none":  # also the plain eager pipeline a user starts from
        loops["eager"] = Loop(base, settings, eager=True)

    # warm-up: two runs each (compilation, allocator, the first run's recompiles per phase)
    for _ in range(2):
        for loop in loops.values():
            _timed(loop, device)

    peak_extra = None
    if device.type == "cuda":
        peaks = {}
        for name in ("unpatched", "patched"):
            loop = loops[name]
            torch.cuda.reset_peak_memory_stats(device)
            _timed(loop, device)
            peaks[name] = torch.cuda.max_memory_allocated(device)
        peak_extra = peaks["patched"] - peaks["unpatched"]

    times: dict[str, list[float]] = {name: [] for name in loops}

    def measure(repeats: int) -> None:
        for _ in range(repeats):
            for name, loop in loops.items():
                times[name].append(_timed(loop, device))

    measure(settings.repeats)
    stats = collect(get_patch(patched), patched)
    log = get_patch(patched).state.log
    geo = log.geometry
    full_steps = stats.steps - stats.pruned_steps - stats.reused_steps
    # N / (full + pruned·r), r a pruned step's cost by the family's cost model (for SD3 the
    # spec's (S+T)/(L+T)): a skipped step costs nothing in this bound
    ratio = 1 / get_patch(patched).adapter.cost_model().run_bound(
        1, 0, geo.tokens, geo.text_tokens, log.budget
    )
    bound = stats.steps / (full_steps + stats.pruned_steps * ratio)

    def speedup() -> float:
        return statistics.median(times["unpatched"]) / statistics.median(times["patched"])

    remeasured = impossible(speedup(), bound)
    if remeasured:  # a disturbed timing (another load on the machine): time more runs
        measure(max(settings.repeats, 3))
    full_ms, pruned_ms = _step_times(loops["patched"])
    select_ms = _selection_time(loops["patched"]) if stats.pruned_steps else 0.0
    patched_median = statistics.median(times["patched"])
    eager = times.get("eager")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return BenchResult(
        settings=asdict(settings),
        device_name=name,
        tokens=geo.tokens,
        budget=log.budget,
        rows=geo.rows,
        unpatched_s=times["unpatched"],
        patched_s=times["patched"],
        eager_unpatched_s=eager,
        speedup=speedup(),
        speedup_vs_eager=statistics.median(eager) / patched_median if eager else None,
        bound=bound,
        fraction_of_bound=speedup() / bound,
        macs_ratio=stats.macs_ratio,
        cache_bytes=log.cache_bytes,
        peak_extra_bytes=peak_extra,
        full_step_ms=full_ms,
        pruned_step_ms=pruned_ms,
        selection_ms=select_ms,
        selection_share=select_ms / pruned_ms if pruned_ms else 0.0,
        plausible=not impossible(speedup(), bound),
        remeasured=remeasured,
        steps_full=full_steps,
        steps_pruned=stats.pruned_steps,
        steps_skipped=stats.reused_steps,
        load_average_before=load,
        busy=busy_note(load) if device.type == "cpu" else "",
    )


def _cpu_name() -> str:
    import os
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
