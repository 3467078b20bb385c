"""The FLUX.1 adapter: everything that knows diffusers' `FluxTransformer2DModel` layout.

`adapter.py` installs the hooks (one generation's data path through the transformer);
`block.py` holds the pruned double- and single-stream blocks; `cost.py` the MAC model.
"""

from .adapter import KNOWN_PROCESSORS, FluxAdapter, check_transformer
from .block import double_block_forward, rotate, single_block_forward
from .cost import FluxDims, step_macs

__all__ = [
    "KNOWN_PROCESSORS",
    "FluxAdapter",
    "FluxDims",
    "check_transformer",
    "double_block_forward",
    "rotate",
    "single_block_forward",
    "step_macs",
]
