"""The denoising loop `catpatch bench` times: one transformer, its family's scheduler, CFG as
its pipelines make it, patched or not; and `_sync`, the device barrier around every timing."""

from __future__ import annotations

import torch

from ...dtypes import torch_dtype
from ...families import family_of
from ...patching import cat_generation, get_patch
from .settings import BenchSettings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
