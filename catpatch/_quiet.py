"""Loading a pipeline without noise that is not the user's business.

`quiet_loading()` wraps one pipeline load: it drops transformers' "`XImageProcessor` requires
torchvision (not installed); falling back to ..." notices (SD3 pipelines import image
processors they do not use for text-to-image), and with `progress=False` also the loading
bars of diffusers and transformers (for a load that takes a second). Everything is restored
on exit: nothing changes for the rest of the user's process.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator

_LOGGERS = ("transformers.utils.import_utils", "transformers")


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


@contextlib.contextmanager
def quiet_loading(progress: bool = True) -> Iterator[None]:
    """Silence the torchvision notices (and, unless `progress`, the loading bars) inside."""
    notice = _NoTorchvisionNotice()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(notice)
    restore = [] if progress else _hide_loading_bars()
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)
        for undo in restore:
            undo()


def _hide_loading_bars() -> list:
    """Disable the progress bars of diffusers and transformers; the functions that undo it."""
    undo = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if module.is_progress_bar_enabled():
            module.disable_progress_bar()
            undo.append(module.enable_progress_bar)
    return undo
