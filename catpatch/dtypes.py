"""Dtype names of the command line (fp32 / bf16 / fp16), and handing a dtype to diffusers."""

from __future__ import annotations

from typing import Any

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """The torch dtype of a command-line name ("bf16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def default_dtype_name(device: Any) -> str:
    """bf16 on a CUDA device, fp32 elsewhere."""
    import torch

    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def from_pretrained_dtype(dtype: Any) -> dict[str, Any]:
    """`from_pretrained` keyword for `dtype`: newer diffusers name it `dtype` and deprecate
    `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    return {key: dtype}
