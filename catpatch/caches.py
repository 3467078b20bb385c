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

    key/value: K/V of the joint attention after qk-norm, image tokens then text tokens
    (R, L+T, D); attn/ff: the block's image attention and FFN outputs before gating (R, L, D);
    *2: the same for the second, image-only attention of SD3.5 dual-attention blocks (no text).
    """

    key: Tensor | None = None
    value: Tensor | None = None
    attn: Tensor | None = None
    ff: Tensor | None = None
    key2: Tensor | None = None
    value2: Tensor | None = None
    attn2: Tensor | None = None

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
    (R·L, ·) tensor; joint_image / joint_text: rows of the computed image tokens / all text
    tokens in a flattened (R·(L+T), D) joint K/V cache; out: (G·S,) rows in the flattened
    (G·L, D) output caches, which hold only the driver rows `rows` (the conditional half of a
    CFG pair that shares its selection); residual: the driver rows' dense residual stream
    (G, L, D) of this step, or None when the run keeps none (lean).
    """

    index: Tensor
    image: Tensor
    joint_image: Tensor
    joint_text: Tensor
    out: Tensor
    rows: slice
    residual: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [self.index, self.image, self.joint_image, self.joint_text, self.out]

    @classmethod
    def of(
        cls, index: Tensor, tokens: int, text_tokens: int, residual: Tensor | None = None
    ) -> StepIndex:
        """The step index of (R, S) `index` when every row keeps its own output caches."""
        rows = torch.arange(index.shape[0], device=index.device)[:, None]
        image = (index + rows * tokens).view(-1)
        text = rows * (tokens + text_tokens) + tokens + torch.arange(text_tokens).to(rows)
        joint = (index + rows * (tokens + text_tokens)).view(-1)
        return cls(index, image, joint, text.view(-1), image, ALL_ROWS, residual)


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
        self.residual: Tensor | None = None  # (R, L, D) dense residual stream, this call only
