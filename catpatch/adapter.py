"""What every model adapter shares: the hooks around one transformer call.

A family's adapter (`sd3/`, `flux/`, `pixart/`) subclasses `ModelAdapter` and adds what knows
its diffusers layout: the checks, the call's geometry, the cache shapes, the pruned blocks and
where the embedder sits. The base hooks the transformer at its pre/post call, its embedder
output, the `norm_out` input and the `proj_out` output, and swaps each block's `forward`.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from .caches import gather_tokens, write_rows
from .hooks import PatchSet
from .schedule import Geometry, Mode
from .state import CATState


def call_argument(args: tuple, kwargs: dict, name: str, position: int):
    """Argument `name` of a call, by keyword or at `position`; None when not passed."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def randn(shape: tuple[int, ...], generator, device=None, dtype=None) -> Tensor:
    """Standard normal values made on the CPU from `generator` (seeded, device-independent),
    or directly on `device` (e.g. the meta device) without one."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def refuse_ip_adapter(transformer, attribute: str) -> None:
    """Raise `TypeError` when an IP-Adapter is loaded (its projection at `attribute`)."""
    if getattr(transformer, attribute, None) is not None:
        raise TypeError(
            "an IP-Adapter is loaded on this transformer; CAT does not support IP-Adapter yet. "
            "Call pipe.unload_ip_adapter() first"
        )


def check_processors(transformer, known: tuple[str, ...], default: str) -> None:
    """Raise `TypeError` for an attention processor our pruned attention would bypass."""
    for name, proc in transformer.attn_processors.items():
        if type(proc).__name__ not in known:
            raise TypeError(
                f"attention processor {type(proc).__name__} at {name} would be bypassed on "
                f"pruned steps; CAT supports {', '.join(known)}. Restore the default "
                f"with transformer.set_attn_processor({default}()) first"
            )


def compiler(mode: str | None):
    """`compile=` mode -> the `torch.compile` of one region, or None when not compiling."""
    if mode is None:
        return None
    return functools.partial(torch.compile, mode=None if mode == "default" else mode, dynamic=False)


class ModelAdapter:
    """Hooks CAT into one transformer instance; `remove()` undoes it exactly.

    A family adds `check`, `text_tokens`, `example_conditioning`, `cost_model`, `_output`
    (the transformer's return type), `_block_shapes` and `_block_forward`."""

    calls_per_step: int | None = 1  # one call per step (CFG batched inside the call)
    batched_cfg = True  # CFG as 2B rows of one call
    block_function = None  # the family's pruned block (a staticmethod)
    timestep_position = 3  # of `timestep` in the transformer's forward
    joint_text = True  # text tokens share the image tokens' K/V cache (joint attention)
    # Whether a step's later calls (true CFG as calls) run as lean followers: no dense stream,
    # the selection's observe eager. Families that batch CFG keep the dense path for every call.
    lean_followers = False
    # Whether the family's block computes anchor steps (image tokens only, text K/V cached).
    anchor_steps = False

    @staticmethod
    def num_blocks(transformer) -> int:
        return len(transformer.transformer_blocks)

    @classmethod
    def example_inputs(
        cls, config, rows: int, height: int, width: int, text_tokens: int, device=None,
        dtype=None, generator=None,
    ) -> dict:  # fmt: skip
        """Random keyword arguments of one transformer call at `height` x `width` pixels
        (latents of an 8x VAE, a mid-schedule timestep and `example_conditioning`)."""
        latents = (rows, config.in_channels, height // 8, width // 8)
        return dict(
            hidden_states=randn(latents, generator, device=device, dtype=dtype),
            timestep=torch.full((rows,), 500.0, device=device),
            **cls.example_conditioning(config, rows, text_tokens, device, dtype, generator),
        )

    def __init__(self, transformer, state: CATState):
        self.transformer = transformer
        self.state = state
        self.patches = PatchSet()
        self.controlnet = None  # this call's ControlNet residuals, where the family has them
        self.timestep: Tensor | None = None  # of the current call, for the token forecast
        self._warned_outside = False

    # -- install / remove
    def install(self) -> None:
        t, p = self.transformer, self.patches
        p.add_handle(t.register_forward_pre_hook(self._pre_call, with_kwargs=True))
        p.add_handle(t.register_forward_hook(self._post_call, with_kwargs=True))
        for module, hook in self._embed_hooks():
            p.add_handle(module.register_forward_hook(hook))
        p.add_handle(t.norm_out.register_forward_pre_hook(self._before_norm_out))
        p.add_handle(t.proj_out.register_forward_hook(self._after_proj_out))
        if self.state.steps.skips:
            forward = functools.partial(self._reusing_forward, t.forward)
            p.set_attribute(t, "forward", functools.update_wrapper(forward, t.forward))
        for i, block in enumerate(self._blocks()):
            forward = functools.partial(self._block_forward, i, block.forward)
            p.set_attribute(block, "forward", functools.update_wrapper(forward, block.forward))
        self._compile_regions()

    def _embed_hooks(self) -> list:
        """(module, forward hook) pairs on the embedding path: the image tokens' embedder."""
        return [(self.transformer.pos_embed, self._after_embed)]

    def _blocks(self) -> list:
        """The blocks in cache order."""
        return list(self.transformer.transformer_blocks)

    def _compile_regions(self) -> None:
        """`compile=`: regional compilation. One compiled function serves every block (dynamo
        reuses a graph across blocks of the same layout, so compile time does not grow with
        depth), one the blocks' own forward on full steps, one the selection; the embeddings
        and hooks between them run eagerly. Nothing is set on the model: removal is free."""
        self._block_fn, self._observe = self.block_function, self.state.observe_output
        self._full_fn = None
        compile_ = compiler(self.state.config.compile)
        if compile_ is None:
            return
        self._block_fn = compile_(self.block_function)
        self._observe = compile_(self.state.observe_output)
        self._full_fn = compile_(type(self.transformer.transformer_blocks[0]).forward)

    def _own_forward(self, original, block, compiled):
        """A block's own forward on a full step: the compiled class forward where `original`
        is still the block's bound method (not a user's wrapper)."""
        if compiled is not None and getattr(original, "__self__", None) is block:
            return functools.partial(compiled, block)
        return original

    def remove(self) -> None:
        self.patches.undo()

    def _block_kwargs(self) -> dict | None:
        """The cache arguments of the family's pruned block on this call; None when the blocks
        run their own forward (neither a recording nor a pruned call)."""
        state, caches, schedule = self.state, self.state.caches, self.state.schedule
        if schedule.mode not in (Mode.PRUNED, Mode.RECORD):
            return None
        pruned = schedule.mode is Mode.PRUNED
        kwargs = dict(
            step=state.step_index if pruned else None,
            residual=caches.residual if pruned else None,
            rows=schedule.driver_slice,
            keep_all=caches.keep,
            output_caches=self._dense(),
        )
        if pruned and state.config.budgeted:  # an anchor step: the text stream is cached
            kwargs["text_cached"] = True
        return kwargs

    def _dense(self) -> bool:
        """Whether this call keeps the dense residual stream and the output caches."""
        state = self.state
        return state.dense if self.lean_followers else not state.config.lean

    # -- cost
    def step_macs(
        self, tokens: int, text: int, computed: int | None = None, lean: bool = False, **kw
    ) -> int:
        """MACs of one call for one batch row (see `cost_model`; `text_cached=True`: an
        anchor step, SD3 only)."""
        return self.cost_model().step_macs(tokens, text, computed, lean, **kw)

    def _step_cost_ratio(self) -> float:
        from .stats import anchored

        geo, config = self.state.schedule.geometry, self.state.config
        full = self.step_macs(geo.tokens, geo.text_tokens)
        budget, lean = self.state.log.budget, config.lean
        cut = self.step_macs(geo.tokens, geo.text_tokens, budget, lean, **anchored(config))
        return cut / full

    # -- transformer call
    def _geometry(self, args: tuple, kwargs: dict) -> Geometry:
        """The call's geometry from latents (R, C, H, W) patched `patch_size` x `patch_size`."""
        hidden = call_argument(args, kwargs, "hidden_states", 0)
        context = call_argument(args, kwargs, "encoder_hidden_states", 1)
        patch = self.transformer.config.patch_size
        return Geometry(
            rows=hidden.shape[0],
            height=hidden.shape[-2] // patch,
            width=hidden.shape[-1] // patch,
            text_tokens=0 if context is None else context.shape[1],
            device=hidden.device,
            dtype=hidden.dtype,
            joint_text=self.joint_text,
        )

    def _features(self) -> int:
        config = self.transformer.config
        return config.patch_size**2 * (config.out_channels or config.in_channels)

    def _extra_call(self, args: tuple, kwargs: dict) -> bool:
        """Whether this call is an extra one inside a step, which runs unpruned."""
        return False

    def _first_calls(self, args: tuple, kwargs: dict) -> None:
        """Checks and settings at a call inside a run, before its mode is planned."""

    def _begin_pruned(self, args: tuple, kwargs: dict):
        """A pruned call starts: make the selection; -> the pre-hook's return value."""
        self.state.begin_pruned_step()
        return None

    # The step bookkeeping stays out of compiled graphs: it is Python state that changes every
    # step, which a traced graph would have to guard on (one recompile per step).
    @torch.compiler.disable
    def _pre_call(self, module, args, kwargs):
        state, schedule = self.state, self.state.schedule
        if self._extra_call(args, kwargs):
            schedule.mode = Mode.PASS
            return None
        if not schedule.in_run:
            self._warn_outside()
        else:
            self._first_calls(args, kwargs)
        mode = state.plan_call(self._geometry(args, kwargs), self._step_cost_ratio)
        schedule.mode = mode
        if mode is Mode.PASS or state.tokens is None:
            return None
        if state.persistent and schedule.step == 0 and schedule.prunes():
            state.allocate(self._block_shapes(), self._features())
        self.timestep = call_argument(args, kwargs, "timestep", self.timestep_position)
        if mode is not Mode.PRUNED:
            return None
        return self._begin_pruned(args, kwargs)

    def _end_call(self) -> None:
        """Drop what this call held."""
        self.controlnet = self.timestep = None

    @torch.compiler.disable
    def _post_call(self, module, args, kwargs, output):
        state, schedule = self.state, self.state.schedule
        mode, schedule.mode = schedule.mode, Mode.PASS
        observed = mode is not Mode.PRUNED or state.steps.observes_pruned
        if mode not in (Mode.PASS, Mode.REUSE) and state.steps.skips and observed:
            sample = output[0] if isinstance(output, tuple) else output.sample
            state.steps.observe(sample, schedule.step, schedule.call)
        self._end_call()
        state.caches.residual = None
        state.finish_call(mode)
        return None

    def _reusing_forward(self, original, *args, **kwargs):
        """A step the step policy skips: its output without running the model."""
        if self.state.schedule.mode is not Mode.REUSE:
            return original(*args, **kwargs)
        schedule = self.state.schedule
        sample = self.state.steps.output(schedule.step, schedule.call)
        return self._output(sample) if kwargs.get("return_dict", True) else (sample,)

    def _warn_outside(self) -> None:
        if not self._warned_outside:
            self._warned_outside = True
            warnings.warn(
                "catpatch: the transformer was called outside a generation, so CAT ran it "
                "unpruned. Pipelines start a generation themselves; with your own denoising loop, "
                "wrap it in `with catpatch.cat_generation(transformer, num_inference_steps=N):`",
                stacklevel=4,
            )

    # -- inside the call
    def _after_embed(self, module, args, output: Tensor):
        state = self.state
        if state.schedule.mode is not Mode.PRUNED:
            return None
        if self._dense():
            # The driver rows' dense residual stream, for this call only; contiguous (a
            # conv embedder leaves (R, D, L) memory order, which every update would read
            # across rows).
            state.caches.residual = state.schedule.driver_rows(output).clone(
                memory_format=torch.contiguous_format
            )
        return gather_tokens(output, state.index)

    def _before_norm_out(self, module, args):
        state = self.state
        if state.schedule.mode is not Mode.PRUNED:
            return None
        dense = state.caches.residual
        if dense is None:
            return None  # lean: the final norm and projection run on the computed tokens only
        hidden, rest = args[0], args[1:]
        if self.controlnet is not None:
            self._add_controlnet(dense)
        if dense.shape[0] != hidden.shape[0]:
            # Shared CFG: the unconditional rows' unselected tokens are replaced by their
            # previous output anyway, so the conditional rows' stream stands in for theirs.
            dense = torch.cat([dense, dense])
        write_rows(dense, state.step_index.image, hidden)
        return (dense, *rest)

    def _add_controlnet(self, dense: Tensor) -> None:
        """Add this call's ControlNet residuals to the dense stream (the driver rows), as the
        transformer adds them after its blocks."""
        raise NotImplementedError

    def _after_proj_out(self, module, args, output: Tensor):
        state = self.state
        if state.schedule.mode in (Mode.PASS, Mode.FULL):
            return None
        # a follower call only writes its computed rows: eager, so that the compiled
        # selection keeps one graph per phase
        follower = self.lean_followers and state.schedule.follower
        observe = state.observe_output if follower else self._observe
        return observe(state.schedule.mode, output, self.timestep)
