"""What a pruned step reads instead of recomputing: per-block K/V and output caches.

Tensors are allocated once per run (at the recording step, or up front with persistent buffers)
and then only updated in place, so within a run every cache keeps its address: what CUDA graphs
need. With persistent buffers they also survive the end of a run and are reused by the next run
of the same geometry; otherwise they are freed when the run ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class BlockCache:
    """What one transformer block keeps between steps (all tokens, per batch row).

    kv: K and V of the joint attention after qk-norm, image tokens then text tokens, stacked
    (2, R, L+T, D) so that a pruned step writes both with one `index_copy_` (`key` and
    `value` are its two halves; T is `Geometry.kv_text_tokens`: 0 where the text is attended
    in a separate cross-attention, as in PixArt); attn/ff: the block's image attention and FFN
    outputs before gating (R, L, D) (a single-stream block, whose attention and MLP share one
    output projection, keeps that projection's output in `attn`); key2/value2/attn2: the same
    for the block's second attention (SD3.5 dual-attention blocks: image-only; PixArt: the
    cross-attention to the text, whose output alone is kept).
    """

    kv: Tensor | None = None
    attn: Tensor | None = None
    ff: Tensor | None = None
    key2: Tensor | None = None
    value2: Tensor | None = None
    attn2: Tensor | None = None

    @property
    def key(self) -> Tensor | None:
        return None if self.kv is None else self.kv[0]

    @property
    def value(self) -> Tensor | None:
        return None if self.kv is None else self.kv[1]

    def tensors(self) -> list[Tensor]:
        return [t for t in vars(self).values() if t is not None]


def keep(buffer: Tensor | None, value: Tensor, persistent: bool = False) -> Tensor:
    """`value` as a state tensor: copied into `buffer` when that is reusable, else owned."""
    reusable = buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (
        value.shape,
        value.dtype,
        value.device,
    )
    if persistent and reusable:
        return buffer.copy_(value)
    value = value.detach()
    if persistent:
        value = value.clone(memory_format=torch.contiguous_format)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(value)
    return value.contiguous()


def static_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero state tensor whose address graphs may treat as fixed."""
    tensor = torch.zeros(shape, dtype=dtype, device=device)
    torch._dynamo.mark_static_address(tensor)
    return tensor


def rows_index(index: Tensor, shape: torch.Size) -> Tensor:
    """Expand (R, S) token indices over the trailing dims of a (R, L, ...) tensor."""
    return index.view(*index.shape, *([1] * (len(shape) - 2))).expand(
        index.shape[0], index.shape[1], *shape[2:]
    )


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[r, index[r]] for every row r. (R, L, ...) -> (R, S, ...)."""
    return x.gather(1, rows_index(index, x.shape))


def gather_positions(table: Tensor, index: Tensor) -> Tensor:
    """Rows of a per-position table shared by all batch rows (e.g. a rotary embedding,
    (L, ...)) for each row's tokens: (R, S) -> (R, S, ...). Device-side, no host sync."""
    return table[index]


def write_rows(buffer: Tensor, rows: Tensor, values: Tensor) -> None:
    """In place: rows `rows` of `buffer` flattened to (N, D) take `values` flattened the same
    way. `index_copy_` on a flat view is what inductor keeps in place (a `scatter_` or a slice
    `copy_` into a graph input becomes a functional copy of the whole buffer)."""
    buffer.view(-1, buffer.shape[-1]).index_copy_(0, rows, values.reshape(-1, values.shape[-1]))


ALL_ROWS = slice(None)


@dataclass
class StepIndex:
    """Where one pruned step's computed tokens go in every block: built once per step.

    index: (R, S) computed tokens per batch row; image: (R·S,) their rows in a flattened
    (R·L, ·) tensor; out: (G·S,) rows in the flattened (G·L, D) output caches, which hold only
    the driver rows `rows` (the conditional half of a CFG pair that shares its selection);
    kv: (2·(R·S + R·T),) rows in the flattened (2·R·(L+T), D) joint K/V cache
    (`BlockCache.kv`): K of the computed image tokens, K of all text tokens, then the same for
    V. A block stacks its K/V projections in this order, so one `index_copy_` writes them all
    (`kv_parts` gives the four parts apart).

    All four are views of one (4, R·S + R·T) buffer that `update` rewrites with one kernel:
    row r = h·G + g of a selection shared by H = R/G rows (a CFG pair) holds token
    chosen[g, j] at image row r·L + chosen[g, j] and joint row r·(L+T) + chosen[g, j]; `out`
    is `image`'s first G·S entries (rows h = 0: the same tokens, offsets g·L).
    """

    buffer: Tensor
    offsets: Tensor  # (4, H, G, 1): row offsets of index, image, K and V rows
    rows: slice
    budget: int  # S
    image_rows: int  # R·S

    @property
    def index(self) -> Tensor:
        return self.buffer[0, : self.image_rows].view(-1, self.budget)

    @property
    def image(self) -> Tensor:
        return self.buffer[1, : self.image_rows]

    @property
    def out(self) -> Tensor:
        return self.buffer[1, : self.offsets.shape[2] * self.budget]

    @property
    def kv(self) -> Tensor:
        return self.buffer[2:].view(-1)

    def kv_parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The rows of `kv` apart: K image, K text, V image, V text."""
        split = self.image_rows
        k, v = self.buffer[2], self.buffer[3]
        return k[:split], k[split:], v[:split], v[split:]

    def tensors(self) -> list[Tensor]:
        return [self.buffer]

    @classmethod
    def of(
        cls,
        index: Tensor,
        tokens: int,
        text_tokens: int,
        chosen: Tensor | None = None,
        rows: slice = ALL_ROWS,
    ) -> StepIndex:
        """The step index of (R, S) `index` for L = `tokens` image and T = `text_tokens` text
        tokens. `chosen` (G, S): the driver rows' own selection when only the rows `rows` keep
        output caches (shared CFG); None when every row keeps its own."""
        chosen = index if chosen is None else chosen
        (num_rows, budget), groups = index.shape, chosen.shape[0]
        device, joint = index.device, tokens + text_tokens
        r = torch.arange(num_rows, device=device).view(num_rows // groups, groups, 1)
        offsets = torch.stack([0 * r, r * tokens, r * joint, r * joint + num_rows * joint])
        buffer = torch.empty(4, num_rows * (budget + text_tokens), dtype=torch.long, device=device)
        text = (r.view(-1, 1) * joint + tokens + torch.arange(text_tokens, device=device)).view(-1)
        buffer[2:, num_rows * budget :] = torch.stack([text, text + num_rows * joint])
        step = cls(buffer, offsets, rows, budget, num_rows * budget)
        step.update(chosen)
        return step

    def update(self, chosen: Tensor) -> None:
        """In place, for a new selection `chosen` (G, S) (shared by a CFG pair when G < R):
        one kernel, addresses unchanged."""
        shape = (*self.offsets.shape[:3], self.budget)
        torch.add(chosen, self.offsets, out=self.buffer[:, : self.image_rows].view(shape))


class Caches:
    """The model-side caches of one patched transformer: a `BlockCache` per block, the last
    output of every token, and the dense residual stream of the step being computed."""

    def __init__(self, num_blocks: int, persistent: bool = False):
        self.num_blocks = num_blocks
        self.persistent = persistent
        self.free()

    def keep(self, buffer: Tensor | None, value: Tensor) -> Tensor:
        """`value` as a cache of this run (reusing `buffer` when persistent)."""
        return keep(buffer, value, self.persistent)

    def allocate(
        self, block_shapes: list[dict[str, tuple[int, ...]]], output_shape: tuple[int, ...], dtype,
        device,
    ) -> None:  # fmt: skip
        """Allocate every cache now, outside any compiled graph, at a static address.

        `block_shapes[i]` maps a `BlockCache` field to its shape; `output_shape` is (R, L, F)."""
        for cache, shapes in zip(self.blocks, block_shapes, strict=True):
            for name, shape in shapes.items():
                setattr(cache, name, static_tensor(shape, dtype, device))
        self.previous = static_tensor(output_shape, dtype, device)

    def tensors(self) -> list[Tensor]:
        named = [t for t in (self.previous, self.residual) if t is not None]
        return [t for c in self.blocks for t in c.tensors()] + named

    def free(self) -> None:
        self.blocks = [BlockCache() for _ in range(self.num_blocks)]
        self.previous: Tensor | None = None  # (R, L, F) last output of every token
        self.residual: Tensor | None = None  # (G, L, D) driver rows' dense stream, this call
