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
    (R·L, ·) tensor; joint: (R, S+T) rows of the computed image tokens, then of all text
    tokens, in a flattened (R·(L+T), D) joint K/V cache (compiled code writes both with one
    `index_copy_`: a second write into the same buffer makes inductor copy the buffer);
    joint_image / joint_text: the two parts apart (eager code writes them separately, with no
    concatenated temporary); out: (G·S,) rows in the flattened (G·L, D) output caches, which
    hold only the driver rows `rows` (the conditional half of a CFG pair that shares its
    selection).
    """

    index: Tensor
    image: Tensor
    joint: Tensor
    joint_image: Tensor
    joint_text: Tensor
    out: Tensor
    rows: slice
    offsets: tuple[Tensor, ...] = ()  # row offsets of `image`, `joint`, `out`

    def tensors(self) -> list[Tensor]:
        named = (self.index, self.image, self.joint, self.joint_image, self.joint_text, self.out)
        unique = {id(t): t for t in named}
        return list(unique.values())

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
        r = torch.arange(index.shape[0], device=index.device)[:, None]
        offsets = (r * tokens, r * (tokens + text_tokens))
        text = offsets[1] + tokens + torch.arange(text_tokens, device=index.device)
        joint_image = index + offsets[1]
        joint = torch.cat([joint_image, text], dim=1)
        image = (index + offsets[0]).view(-1)
        if chosen is not None:
            offsets += (r[: chosen.shape[0]] * tokens,)
            out = (chosen + offsets[2]).view(-1)
        else:
            out = image
        return cls(
            index.clone(), image, joint, joint_image.view(-1), text.view(-1), out, rows, offsets
        )  # fmt: skip

    def update(self, chosen: Tensor) -> None:
        """In place, for a new selection `chosen` (G, S) (shared by a CFG pair when G < R):
        a few small kernels, addresses unchanged."""
        index, image_offset, joint_offset = self.index, self.offsets[0], self.offsets[1]
        rows, budget = index.shape
        if chosen.shape[0] == rows:
            index.copy_(chosen)
        else:  # a CFG pair shares its conditional row's selection
            index.view(2, -1, budget).copy_(chosen.unsqueeze(0))
        torch.add(index, image_offset, out=self.image.view(rows, budget))
        torch.add(index, joint_offset, out=self.joint_image.view(rows, budget))
        self.joint[:, :budget] = self.joint_image.view(rows, budget)
        if self.out is not self.image:
            torch.add(chosen, self.offsets[2], out=self.out.view(chosen.shape))


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
