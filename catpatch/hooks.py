"""A tiny reversible-patch engine: every change made to a user's object is undone exactly.

Two kinds of change are recorded: torch hook handles, and instance attributes (a module's
`forward`, a pipeline method wrapped with wrapt). Undo restores the instance `__dict__` to what
it was, so a removed patch leaves no attribute behind, and never touches a class.
`wrap_denoising_loops` is the one pipeline wrapper CAT and the diffusers peers share: callbacks
around each denoising loop (the `with` block of the pipeline's progress bar).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import wrapt

_MISSING = object()


class PatchSet:
    """An ordered record of changes to objects, undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def add_handle(self, handle: Any) -> None:
        """Keep a torch `RemovableHandle` (from `register_forward_hook` and friends)."""
        self._undo.append(handle.remove)

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Set `obj.name = value` on the instance; undo restores or deletes the instance entry."""
        namespace = vars(obj)
        previous = namespace.get(name, _MISSING)
        namespace[name] = value

        def undo() -> None:
            if previous is _MISSING:
                namespace.pop(name, None)
            else:
                namespace[name] = previous

        self._undo.append(undo)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


Callback = Callable[[], Any]


class LoopScope(wrapt.ObjectProxy):
    """A pipeline's progress bar whose `with` block (one denoising loop) also calls `enter()`
    before it and `exit()` after it, also when the loop ends by an exception or interrupt;
    and `step()`, if given, at each `update()` (the loop finished a step)."""

    def __init__(self, bar, enter: Callback, exit: Callback, step: Callback | None = None):
        super().__init__(bar)
        self._self_enter, self._self_exit, self._self_step = enter, exit, step

    def update(self, *args, **kwargs):
        if self._self_step is not None:
            self._self_step()
        return self.__wrapped__.update(*args, **kwargs)

    def __enter__(self):
        self._self_enter()
        entered = self.__wrapped__.__enter__()
        # the loop's `as bar` must be this proxy, for its `update()` to reach `step()`
        return self if entered is self.__wrapped__ else entered

    def __exit__(self, *exc):
        self._self_exit()
        return self.__wrapped__.__exit__(*exc)


def wrap_denoising_loops(
    patches: PatchSet, pipe: Any, scope: Callable[[dict], tuple[Callback, ...] | None]
) -> None:
    """Wrap the instance's `pipe.progress_bar` (recorded in `patches`, so undone with them):
    each bar it opens gets the (enter, exit[, step]) callbacks `scope(kwargs)` returns for the
    call's keyword arguments; None leaves that bar as it is."""

    def open_bar(wrapped, instance, args, kwargs):
        bar = wrapped(*args, **kwargs)
        callbacks = scope(kwargs)
        return bar if callbacks is None else LoopScope(bar, *callbacks)

    patches.set_attribute(pipe, "progress_bar", wrapt.FunctionWrapper(pipe.progress_bar, open_bar))
