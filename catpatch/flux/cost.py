"""The MAC model of a FLUX transformer call (per batch row), exact for the matrix products.

Per double-stream block, D hidden, L image, T text, S computed tokens: 12·D²·(S+T) for the
Q/K/V/out projections and FFNs of both streams, 2·D·(S+T)·(L+T) for the joint attention, and
12·D² for the two AdaLN modulations. Per single-stream block: 12·D²·(S+T) (Q/K/V 3·D², MLP in
4·D², the shared output projection 5·D²), the same attention, and 3·D² of modulation. Every call
pays the embedders (image tokens all L: they are pruned after the embedding), the final AdaLN
and the output projection of all L tokens (lean: the S computed ones).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FluxDims:
    """The sizes of a `FluxTransformer2DModel` that its cost depends on."""

    hidden: int
    double_layers: int
    single_layers: int
    in_features: int  # per image token into x_embedder (packed latents: 4 x latent channels)
    out_features: int  # per image token out of proj_out
    joint_dim: int
    pooled_dim: int
    guidance: bool
    mlp_ratio: int = 4
    time_proj_dim: int = 256

    @classmethod
    def from_config(cls, config) -> FluxDims:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        patch, channels = get("patch_size", 1), get("in_channels", 64)
        return cls(
            hidden=get("num_attention_heads") * get("attention_head_dim"),
            double_layers=get("num_layers"),
            single_layers=get("num_single_layers"),
            in_features=channels,
            out_features=patch * patch * (get("out_channels") or channels),
            joint_dim=get("joint_attention_dim"),
            pooled_dim=get("pooled_projection_dim"),
            guidance=bool(get("guidance_embeds", False)),
        )

    def step_macs(
        self, tokens: int, text: int, computed: int | None = None, lean: bool = False
    ) -> int:
        """MACs of one call for one batch row (see `step_macs`)."""
        return step_macs(self, tokens, text, computed, lean)

    def run_bound(self, steps: int, warmup: int, tokens: int, text: int, budget: int) -> float:
        """The specification's arithmetic speed-up bound (`catpatch.stats.run_bound`)."""
        from ..stats import run_bound

        return run_bound(steps, warmup, tokens, text, budget)


def step_macs(
    dims: FluxDims, tokens: int, text: int, computed: int | None = None, lean: bool = False
) -> int:
    """MACs of one FLUX transformer call for one batch row, `computed` of the `tokens` image
    tokens computed (all when None); `lean`: the output projection runs on those only."""
    d, t = dims.hidden, text
    n = tokens if computed is None else computed
    projected = n if lean else tokens
    embed = (dims.time_proj_dim * d + d * d) * (2 if dims.guidance else 1)
    outer = (
        tokens * dims.in_features * d  # x_embedder
        + t * dims.joint_dim * d  # context_embedder
        + embed
        + dims.pooled_dim * d
        + d * d  # pooled text embedding
        + d * 2 * d  # norm_out
        + projected * d * dims.out_features  # proj_out
    )
    attention = 2 * d * (n + t) * (tokens + t)
    ff = 2 * dims.mlp_ratio * d * d
    double = (4 * d * d + ff) * (n + t) + attention + 12 * d * d
    single = (3 + 2 * dims.mlp_ratio + 1) * d * d * (n + t) + attention + 3 * d * d
    return outer + dims.double_layers * double + dims.single_layers * single
