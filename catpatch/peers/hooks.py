"""What the diffusers-cache peers (`magcache`, `firstblock`) share around diffusers' hooks.

Both hook a step-skipping cache of diffusers into an SD3 transformer and need, around it:

- A record for clean removal. diffusers' `HookRegistry.remove_hook` puts back the `forward` a
  hook wrapped, but leaves the registry (`_diffusers_hook`) and a bound `forward` on each
  instance it hooked. `start_record` notes, before the hooks go on, which of the transformer and
  its blocks have no registry yet (and whether they had an instance `forward`);
  `remove_cache_hooks` deletes what diffusers left on those once their registry is empty.
- A skip counter. Whether a step's blocks were skipped is the head-block hook's state
  (`should_compute`); `watch` reads it after each call of the first block.
- A refusal of skip-layer guidance (SD3.5): its second transformer call per step, with another
  batch, does not fit the cached residual nor the caches' one-call-per-step state; `watch`
  raises on such a call before the transformer runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..hooks import PatchSet


@dataclass
class CacheRecord:
    """What a peer leaves on a pipeline: its patches, the modules that got a hook registry
    from it (with whether each had an instance `forward`), and the skipped steps of the last
    generation out of `steps` transformer calls."""

    patches: PatchSet
    new_registries: list[tuple[Any, bool]]
    skipped: list[int] = field(default_factory=list)
    steps: int = 0


def start_record(transformer: Any) -> CacheRecord:
    """An empty record for `transformer`; call it before anything is hooked or patched."""
    modules = [transformer, *transformer.transformer_blocks]
    return CacheRecord(PatchSet(), _without_registry(modules))


def watch(record: CacheRecord, transformer: Any, head_hook: str, refusal: str) -> None:
    """Count the skipped steps into `record` from the state of diffusers' hook `head_hook` on
    the first block, and raise `ValueError(refusal)` on a skip-layer call; both hooks are
    undone with `record.patches`. Call it after diffusers' hooks are applied."""
    head_block = transformer.transformer_blocks[0]
    head = head_block._diffusers_hook.get_hook(head_hook)

    def count(module, args, kwargs, output) -> None:
        if not head.state_manager.get_state().should_compute:
            record.skipped.append(record.steps)
        record.steps += 1

    def refuse_skip_layers(module, args, kwargs) -> None:
        if kwargs.get("skip_layers") is not None:
            raise ValueError(refusal)

    record.patches.add_handle(head_block.register_forward_hook(count, with_kwargs=True))
    record.patches.add_handle(
        transformer.register_forward_pre_hook(refuse_skip_layers, with_kwargs=True)
    )


def remove_cache_hooks(transformer: Any, names: Iterable[str], record: CacheRecord) -> None:
    """Remove diffusers' hooks `names` from `transformer` and its children, then delete the
    registries `record` notes as new that are left empty, with the bound `forward` diffusers
    left on them. `record.patches` is the caller's to undo, before or after."""
    registry = registry_of(transformer)
    for name in names:
        registry.remove_hook(name)  # puts back the `forward` the hook wrapped
    for module, had_forward in record.new_registries:
        if not module._diffusers_hook.hooks:
            # diffusers leaves its registry and the original bound `forward` on the instance
            del module._diffusers_hook
            if not had_forward:
                vars(module).pop("forward", None)
    if hasattr(transformer, "_diffusers_hook"):
        registry.invalidate_child_registries_cache()  # it lists hooked modules


def skipped_steps(pipe: Any, attribute: str, peer: str) -> list[int]:
    """The skipped steps of the record at `pipe.<attribute>`; `peer` names it in the error."""
    record = vars(pipe).get(attribute)
    if record is None:
        raise ValueError(f"{peer} is not applied to this pipeline")
    return list(record.skipped)


def registry_of(model: Any) -> Any:
    """`model`'s diffusers hook registry, created if it has none."""
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(model)


def _without_registry(modules: Iterable[Any]) -> list[tuple[Any, bool]]:
    return [(m, "forward" in vars(m)) for m in modules if not hasattr(m, "_diffusers_hook")]
