"""The MAC model of a PixArt transformer step (a `stats.CostModel`).

Per block and sample, D hidden, L image, S computed, T text tokens, FFN hidden 4·D:
self-attention projections 4·D²·S and attention 2·D·S·L (S queries over all L cached keys);
cross-attention query/output 2·D²·S, its K/V of the text 2·D²·T (every step) and attention
2·D·S·T; FFN 8·D²·S. Outside the blocks every step pays the patch embedding of all L tokens,
the caption projection, adaLN-single's timestep embedding and the output projection (all L
tokens, or the S computed ones when lean). Exact for the matrix products torch counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PixArtDims:
    """The sizes of a `PixArtTransformer2DModel` that its cost depends on."""

    hidden: int
    layers: int
    patch: int
    in_channels: int
    out_channels: int
    caption_dim: int | None  # T5 width (caption_channels); None: no caption projection
    size_conditions: bool  # use_additional_conditions (PixArt-α 1024): resolution, aspect
    time_proj_dim: int = 256

    @classmethod
    def from_config(cls, config) -> PixArtDims:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        conditions = get("use_additional_conditions")
        if conditions is None:  # as diffusers decides it
            conditions = get("sample_size") == 128
        return cls(
            hidden=get("num_attention_heads") * get("attention_head_dim"),
            layers=get("num_layers"),
            patch=get("patch_size"),
            in_channels=get("in_channels"),
            out_channels=get("out_channels") or get("in_channels"),
            caption_dim=get("caption_channels"),
            size_conditions=bool(conditions),
        )

    def block_macs(self, tokens: int, text: int, computed: int) -> int:
        d = self.hidden
        self_attention = 4 * d * d * computed + 2 * d * computed * tokens
        cross_attention = 2 * d * d * computed + 2 * d * d * text + 2 * d * computed * text
        return self_attention + cross_attention + 8 * d * d * computed

    def step_macs(
        self, tokens: int, text: int, computed: int | None = None, lean: bool = False
    ) -> int:
        """MACs of one transformer call for one sample (batch rows multiply it)."""
        d, t = self.hidden, self.time_proj_dim
        computed = tokens if computed is None else computed
        projected = computed if lean else tokens
        size = d // 3
        outer = (
            tokens * self.patch**2 * self.in_channels * d  # patch embedding
            + (text * (self.caption_dim * d + d * d) if self.caption_dim else 0)
            + t * d + d * d + d * 6 * d  # timestep embedding, adaLN-single's linear
            + (3 * (t * size + size * size) if self.size_conditions else 0)
            + projected * d * self.patch**2 * self.out_channels  # proj_out
        )  # fmt: skip
        return outer + self.layers * self.block_macs(tokens, text, computed)

    def run_bound(self, steps: int, warmup: int, tokens: int, text: int, budget: int) -> float:
        """Arithmetic speed-up bound: full-step MACs over the run's, pruned steps at `budget`."""
        if steps <= warmup:
            return 1.0
        ratio = self.step_macs(tokens, text, budget) / self.step_macs(tokens, text)
        return steps / (warmup + (steps - warmup) * ratio)
