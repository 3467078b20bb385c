"""PixArt-Σ next to other add-ons: PEFT LoRA, diffusers' model CPU offload and the compile
option (mirrors test_interop and test_compile for SD3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import check_model_cpu_offload
from pixart_support import CFG, EXACT, SHAPE, generate, pixart
from torch._dynamo.utils import counters

from catpatch import apply_cat, cat_stats, remove_cat
from catpatch.models.shapes import build_transformer


# ---- interop: PEFT LoRA, CPU offload ----------------------------------------------------------
def _lora_state(seed: int = 7) -> dict:
    """A PEFT LoRA on the attention and FFN linears of the tiny PixArt transformer, with
    weights large enough to change the image visibly."""
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = build_transformer(SHAPE)
    torch.manual_seed(seed)
    inject_adapter_in_model(_lora_config(), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    return get_peft_model_state_dict(model)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
    )  # fmt: skip


def _load_lora(pipe, state: dict) -> None:
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    inject_adapter_in_model(_lora_config(), pipe.transformer)
    set_peft_model_state_dict(pipe.transformer, state)


@pytest.mark.parametrize("order", ["lora_first", "cat_first"])
def test_peft_lora_before_and_after_apply(order):
    state = _lora_state()
    base = generate(pixart())
    reference = pixart()
    _load_lora(reference, state)
    with_lora = generate(reference)
    assert np.abs(with_lora - base).max() > 1e-3, "the LoRA does nothing"
    pipe = pixart()
    if order == "lora_first":
        _load_lora(pipe, state)
        apply_cat(pipe, EXACT)
    else:
        apply_cat(pipe, EXACT)
        _load_lora(pipe, state)
    np.testing.assert_allclose(generate(pipe), with_lora, atol=1e-5)
    assert cat_stats(pipe).pruned_steps == 6
    # pruned for real, the LoRA still acts on the computed tokens
    apply_cat(pipe, CFG)
    pruned_lora = generate(pipe)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in pipe.transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(False)
    assert np.abs(pruned_lora - generate(pipe)).max() > 1e-3


@pytest.mark.parametrize("order", ["offload_first", "cat_first"])
def test_model_cpu_offload_hooks_and_cat(order):
    """diffusers' model offload hooks (accelerate) next to ours, in either order."""
    check_model_cpu_offload(order, pixart, generate, CFG)


# ---- the compile option -----------------------------------------------------------------------
def test_compile_option_matches_eager_without_per_step_recompiles():
    """Compiled CAT equals eager CAT and compiles nothing new after its first pruned step, in
    the first (cold) generation and in later ones."""
    torch._dynamo.reset()
    pipe = pixart()
    apply_cat(pipe, CFG)
    eager = generate(pipe)
    start = counters["stats"]["unique_graphs"]
    apply_cat(pipe, CFG.replace(compile="default"))
    per_step = []
    first = generate(pipe, callback=lambda i, t, x: per_step.append(
        counters["stats"]["unique_graphs"]))  # fmt: skip
    t0 = CFG.warmup_steps
    assert per_step[t0] > start, "the first pruned step compiled nothing: not compiled?"
    assert per_step[-1] == per_step[t0], f"graphs grow with the pruned steps: {per_step[t0:]}"
    graphs = counters["stats"]["unique_graphs"]
    second = generate(pipe)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled in a warm generation"
    np.testing.assert_allclose(first, eager, atol=2e-4)
    np.testing.assert_allclose(second, eager, atol=2e-4)
    remove_cat(pipe)
    torch._dynamo.reset()
