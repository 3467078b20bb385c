"""The SD3-family adapter: everything that knows diffusers' `SD3Transformer2DModel` layout.

`adapter.py` installs the hooks (one generation's data path through the transformer);
`block.py` is the pruned `JointTransformerBlock`. Supporting another transformer family means a
sibling package with the same two parts.
"""

from ..caches import gather_tokens
from .adapter import KNOWN_PROCESSORS, SD3Adapter, check_transformer
from .block import attention, cat_block_forward

__all__ = [
    "KNOWN_PROCESSORS",
    "SD3Adapter",
    "attention",
    "cat_block_forward",
    "check_transformer",
    "gather_tokens",
]
