"""First-order forecast of the outputs of tokens a pruned step does not compute.

Zeroth order (the default, `CATConfig.token_order=0`) gives an unselected token its last
computed output. First order (`token_order=1`) extrapolates each token along the slope between
its last two computed outputs, linear in the model's timestep (σ·1000 for SD3's flow matching,
whose velocity output drifts smoothly in σ):

    out(t) = out(t1) + (t - t1) · (out(t1) - out(t2)) / (t1 - t2)

with t1, t2 the timesteps of the token's last two computations. The state is a float32 slope
(R, L, F) and the timestep of each token's last computation (R, L, 1); a pruned step updates
the selected rows in place and forecasts all tokens in a few elementwise kernels: static
shapes, no host syncs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .caches import gather_tokens, keep, static_tensor, write_rows


class TokenForecast:
    """Per-token slope and last-computed timestep of one run."""

    def __init__(self, persistent: bool = False):
        self.persistent = persistent
        self.free()

    def free(self) -> None:
        self.slope: Tensor | None = None  # (R, L, F) float32, output change per timestep unit
        self.stamp: Tensor | None = None  # (R, L, 1) float32, timestep of the last computation
        self._reference: tuple[Tensor, Tensor] | None = None  # full output and time, step t0-2

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.slope, self.stamp) if t is not None]

    def allocate(self, shape: tuple[int, ...], device: torch.device) -> None:
        """Static buffers for a run whose model output is `shape` (R, L, F)."""
        self.slope = static_tensor(shape, torch.float32, device)
        self.stamp = static_tensor((*shape[:2], 1), torch.float32, device)

    def observe_reference(self, output: Tensor, time: Tensor) -> None:
        """The full output (R, L, F) of the reference step (t0-2) and its timestep (R,)."""
        self._reference = (output.float(), time.float())

    def start(self, output: Tensor, time: Tensor) -> None:
        """The recording step (t0-1) computed every token: slopes from the reference step."""
        reference, earlier = self._reference
        now = _column(time)
        slope = _divide(output.float() - reference, now - _column(earlier))
        self.slope = keep(self.slope, slope, self.persistent)
        self.stamp = keep(self.stamp, now.expand(*output.shape[:2], 1), self.persistent)
        self._reference = None

    def update(self, previous: Tensor, index: Tensor, rows: Tensor, new: Tensor, time: Tensor):
        """Before `previous` (R, L, F) takes the computed tokens' outputs `new` (R, S, F): their
        slopes from the old value, and their timestep. `index` (R, S) are the tokens, `rows`
        their rows in the flattened (R·L, ·) tensors."""
        now = _column(time)
        old = gather_tokens(previous, index).float()
        then = gather_tokens(self.stamp, index)
        write_rows(self.slope, rows, _divide(new.float() - old, now - then))
        write_rows(self.stamp, rows, now.expand(*index.shape, 1))

    def apply(self, previous: Tensor, time: Tensor) -> Tensor:
        """Every token's forecast output at `time` (R,): exact for the tokens just computed."""
        ahead = _column(time) - self.stamp
        return torch.addcmul(previous.float(), self.slope, ahead).to(previous.dtype)


def _column(time: Tensor) -> Tensor:
    """Timesteps (R,) as (R, 1, 1) float32, to broadcast over tokens and features."""
    return time.float().view(-1, 1, 1)


def _divide(change: Tensor, elapsed: Tensor) -> Tensor:
    """change / elapsed, zero where no time passed (a loop that repeats a timestep)."""
    safe = torch.where(elapsed == 0, torch.ones_like(elapsed), elapsed)
    return torch.where(elapsed == 0, torch.zeros_like(change), change / safe)
