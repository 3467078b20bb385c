"""The PixArt-Σ adapter: everything that knows diffusers' `PixArtTransformer2DModel` layout.

`adapter.py` installs the hooks, `block.py` is the pruned `BasicTransformerBlock`
(ada_norm_single: self-attention over cached K/V, cross-attention to T5, FFN), `cost.py` its
MAC model.
"""

from .adapter import KNOWN_PROCESSORS, PixArtAdapter, check_transformer
from .block import cat_block_forward, self_attention
from .cost import PixArtDims

__all__ = [
    "KNOWN_PROCESSORS",
    "PixArtAdapter",
    "PixArtDims",
    "cat_block_forward",
    "check_transformer",
    "self_attention",
]
