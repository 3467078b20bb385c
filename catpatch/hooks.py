"""A tiny reversible-patch engine: every change made to a user's object is undone exactly.

Two kinds of change are recorded: torch hook handles, and instance attributes (a module's
`forward`, a pipeline method wrapped with wrapt). Undo restores the instance `__dict__` to what
it was, so a removed patch leaves no attribute behind, and never touches a class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
