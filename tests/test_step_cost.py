"""What a pruned step costs: census targets, memory order, in-place caches, regional compile.

The census runs the real SD3-medium shape on the `meta` device (exact counts, no GPU); the
inductor checks read the code inductor generates on the CPU, which is the same graph a GPU
gets up to the kernel language.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import make_pipe
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats, remove_cat
from catpatch.caches import BlockCache, StepIndex
from catpatch.census import census
from catpatch.models.shapes import build_transformer
from catpatch.patching import get_patch
from catpatch.schedule import Mode
from catpatch.sd3 import cat_block_forward, gather_tokens


def _fixed_text(pipe, rows: int) -> dict[str, torch.Tensor]:
    """Seeded prompt embeddings (21 text tokens) in place of the text encoders' outputs."""
    gen = torch.Generator().manual_seed(11)
    dim = pipe.transformer.config.joint_attention_dim
    pooled = pipe.transformer.config.pooled_projection_dim
    return dict(
        prompt_embeds=torch.randn(rows, 21, dim, generator=gen),
        negative_prompt_embeds=torch.randn(rows, 21, dim, generator=gen),
        pooled_prompt_embeds=torch.randn(rows, pooled, generator=gen),
        negative_pooled_prompt_embeds=torch.randn(rows, pooled, generator=gen),
    )


def _record_pruned_steps(pipe, cfg_selection: str) -> list[dict]:
    """Run the pipeline under CAT (two images, CFG pairs) and keep, for every pruned step, what
    the reference needs: the call's inputs, the caches and selection it started from, and the
    model output before and after the unselected tokens took their previous output."""
    apply_cat(pipe, CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8,
                              cfg_selection=cfg_selection, lean=False))  # fmt: skip
    model, state = pipe.transformer, get_patch(pipe).state
    calls, finals = [], []

    def before(module, args, kwargs):  # before catpatch's own pre-hook
        index = None if state.chosen is None else state.schedule.rows_of(state.chosen).clone()
        blocks = copy.deepcopy(state.caches.blocks) if index is not None else None
        calls.append(dict(kwargs=dict(kwargs), index=index, caches=blocks))

    hooks = [
        model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
        model.norm_out.register_forward_pre_hook(lambda m, a: calls[-1].update(dense=a[0].clone())),
        model.proj_out.register_forward_hook(
            lambda m, a, o: calls[-1].update(raw=o.clone()), prepend=True
        ),
        model.proj_out.register_forward_hook(lambda m, a, o: finals.append(o.clone())),
    ]
    try:
        generator = torch.Generator().manual_seed(3)
        pipe(height=128, width=192, num_inference_steps=10, generator=generator,
             output_type="latent", **_fixed_text(pipe, 2))  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    modes = [m for m, *_ in cat_stats(pipe).per_step]
    remove_cat(pipe)
    assert modes.count("pruned") == 6, modes
    for call, final, previous, mode in zip(
        calls[1:], finals[1:], finals[:-1], modes[1:], strict=True
    ):
        call.update(final=final, previous=previous, pruned=mode == "pruned")
    return [c for c in calls[1:] if c["pruned"]]


def _rows(tensor: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """An output cache held for the conditional rows only (shared selection), padded with zero
    rows for the unconditional ones: their unselected tokens' stream is never read."""
    if tensor is None or tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:]), tensor])


@pytest.mark.parametrize("shape", ["tiny-sd3", "tiny-sd3.5-medium", "tiny-sd3.5-large"])
@pytest.mark.parametrize("cfg_selection", ["shared", "per_row"])
def test_pruned_steps_of_a_cfg_run_match_the_literal_spec(shape, cfg_selection):
    """Every pruned step of a pipeline run with CFG pairs against the arithmetic before the
    rework, written out in-process (`test_block._literal_step`: scatter writes into the caches,
    attention spelled out, every token walking every block), from the same caches, selection
    and inputs. Both sides run on this machine, so the check means the same on any CPU, BLAS
    or library version. Tolerance: the two sum in different orders (SDPA against a written-out
    softmax, fused cache writes against scatter); float32 rounding (eps 1.2e-7) over dot
    products of at most a few hundred terms and a few blocks stays well below 1e-4, while a
    wrong cache row, token or CFG row moves these O(1) outputs by 1e-2 or more."""
    from test_block import _literal_step

    pipe = make_pipe(shape)
    model = pipe.transformer
    with torch.no_grad():
        for step in _record_pruned_steps(pipe, cfg_selection):
            kwargs, index = step["kwargs"], step["index"]
            rows = index.shape[0]
            caches = step["caches"]
            for cache in caches:
                for name in ("attn", "ff", "attn2"):
                    setattr(cache, name, _rows(getattr(cache, name), rows))
            latents = kwargs["hidden_states"]
            text = kwargs["encoder_hidden_states"], kwargs["pooled_projections"]
            dense, temb = _literal_step(model, caches, index, latents, *text, kwargs["timestep"])
            raw = model.proj_out(model.norm_out(dense, temb))
            tol = dict(atol=1e-4, rtol=1e-4)
            # the computed tokens of every row, unconditional rows included
            torch.testing.assert_close(
                gather_tokens(step["raw"], index), gather_tokens(raw, index), **tol
            )
            # the rows that drive the selection keep the dense stream of every token
            drivers = slice(rows // 2, None) if cfg_selection == "shared" else slice(None)
            torch.testing.assert_close(step["dense"][drivers], dense[drivers], **tol)
            # the returned output: this step's computed tokens, the others' previous output
            expected = step["previous"].clone()
            expected.scatter_(1, index[..., None].expand(-1, -1, raw.shape[-1]),
                              gather_tokens(step["raw"], index))  # fmt: skip
            assert torch.equal(step["final"], expected)


# ---- census at the real SD3-medium size (meta device) ------------------------------------------
@pytest.fixture(scope="module")
def sd3_medium():
    return {
        lean: census("sd3-medium", 1024, 1024, CATConfig(selection="cat", lean=lean))
        for lean in (False, True)
    }


def test_cache_memory_at_sd3_medium_1024(sd3_medium):
    # bf16, CFG pair, shared selection: was 2.52e9 B (K/V and output caches of both rows)
    assert sd3_medium[False].cache_bytes <= 1.95e9
    assert sd3_medium[True].cache_bytes <= 1.35e9


def test_pruned_step_traffic_and_flops_at_sd3_medium_1024(sd3_medium):
    exact, lean = sd3_medium[False], sd3_medium[True]
    for c in (exact, lean):
        assert c.full.flops > 0 and 0.34 < c.pruned.flops / c.full.flops < 0.36  # (S+T)/(L+T)
        # was 70 kernels: one sort ranks drift and recency, a walk table per cluster rank
        assert c.selection.kernels <= 37 and c.selection.bytes < 0.001 * c.pruned.bytes
    # kernels of a pruned step, its selection included, against a full one: were 1444 / 1344
    # against 1242 (silu(temb) once, one 1 + emb per norm, one K/V write per block)
    assert exact.pruned.kernels <= exact.full.kernels
    assert lean.pruned.kernels <= lean.full.kernels - 100
    # non-GEMM bytes of a pruned step against a full one: was 0.50
    assert lean.pruned.other_bytes <= 0.35 * lean.full.other_bytes
    assert exact.pruned.other_bytes <= 0.43 * exact.full.other_bytes
    # no scatter_ or slice copy into a cache: every cache write is one index_copy_
    for c in (exact, lean):
        assert c.pruned.ops["scatter_"] == c.selection.ops["scatter_"]
        assert c.pruned.ops["copy_"] <= 1  # the next selection; the step index is one add
    blocks = 24
    # eager: one K/V write per block (projected straight into one stacked buffer), then the
    # last output
    assert lean.pruned.ops["index_copy_"] == blocks + 1
    assert exact.pruned.ops["index_copy_"] == 3 * blocks + 2  # + attention / FFN caches, stream


# ---- memory order in eager pruned steps ---------------------------------------------------------
class _ElementwiseOrder(TorchDispatchMode):
    """Records elementwise ops that read a (R, L, D) operand whose last dim is not dense."""

    ELEMENTWISE = {"add", "add_", "mul", "mul_", "addcmul_", "addcmul", "where", "sub"}

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens, self.bad, self.active = tokens, [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.active and name in self.ELEMENTWISE:
            for a in args:
                dense = isinstance(a, torch.Tensor) and a.dim() == 3 and a.shape[1] == self.tokens
                if dense and not a.is_contiguous():
                    self.bad.append((name, tuple(a.shape), a.stride()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cfg", [False, True])
def test_pruned_step_reads_no_transposed_operand(cfg):
    torch.manual_seed(0)
    model = build_transformer("tiny-sd3.5-medium")
    apply_cat(model, CATConfig(selection="cat", warmup_steps=2, num_clusters=4))
    rows = 2
    inputs = dict(
        encoder_hidden_states=torch.randn(rows, 9, 64),
        pooled_projections=torch.randn(rows, 64),
        timestep=torch.full((rows,), 500.0),
    )
    mode = _ElementwiseOrder(tokens=256)
    # from the patch embedding's output on (the embedding itself is diffusers' own, unpruned)
    model.pos_embed.register_forward_pre_hook(lambda *_: setattr(mode, "active", False))
    model.pos_embed.register_forward_hook(lambda *_: setattr(mode, "active", True))
    with torch.no_grad(), cat_generation(model, 4, cfg=cfg):
        for step in range(3):
            if step == 2:
                with mode:
                    model(hidden_states=torch.randn(rows, 16, 32, 32), **inputs)
            else:
                model(hidden_states=torch.randn(rows, 16, 32, 32), **inputs)
        assert get_patch(model).state.log.steps[-1].mode is Mode.PRUNED
    assert not mode.bad, mode.bad


# ---- the caches stay in place under inductor --------------------------------------------------
def test_inductor_updates_the_caches_in_place():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = build_transformer("tiny-sd3").transformer_blocks[1]
    rows, tokens, text, dim, budget = 2, 64, 7, 32, 19
    h, ctx, temb = torch.randn(rows, tokens, dim), torch.randn(rows, text, dim), torch.randn(2, 32)
    cache = BlockCache()
    with torch.no_grad():
        cat_block_forward(block, cache, h, ctx, temb)  # the recording step fills it
        index = torch.stack([torch.randperm(tokens)[:budget].sort().values for _ in range(rows)])
        step, residual = StepIndex.of(index, tokens, text), h.clone()
        compiled = torch.compile(cat_block_forward, fullgraph=True, dynamic=False)
        before = [t.data_ptr() for t in cache.tensors()]
        x = gather_tokens(h, index)
        _, codes = run_and_get_code(compiled, block, cache, x, ctx, temb, step, residual)
    assert [t.data_ptr() for t in cache.tensors()] == before
    code = "\n".join(codes)
    # no buffer of a cache's size (K/V: 2 x rows x (L+T) x D, or one half; outputs: rows x L x
    # D) is allocated
    sizes = {2 * rows * (tokens + text) * dim, rows * (tokens + text) * dim, rows * tokens * dim}
    allocated = re.findall(r"empty_strided\w*\(\(([\d, ]+)\)", code)
    numels = [eval("*".join(s.replace(" ", "").strip(",").split(","))) for s in allocated]
    assert not sizes & set(numels), f"a cache-sized temporary: {allocated}"
    torch._dynamo.reset()


# ---- regional compilation -----------------------------------------------------------------------
def _graphs_of_a_compiled_run(layers: int) -> int:
    torch._dynamo.reset()
    model = build_transformer("tiny-sd3", num_layers=layers)
    apply_cat(model, CATConfig(selection="cat", warmup_steps=2, num_clusters=4, compile="default"))
    rows = 2
    inputs = dict(
        encoder_hidden_states=torch.randn(rows, 9, 64),
        pooled_projections=torch.randn(rows, 64),
    )
    start = counters["stats"]["unique_graphs"]
    with torch.no_grad(), cat_generation(model, 5):
        for step in range(5):
            model(
                hidden_states=torch.randn(rows, 16, 16, 16),
                timestep=torch.full((rows,), 900.0 - 100 * step),
                **inputs,
            )
    return counters["stats"]["unique_graphs"] - start


def test_regional_compile_graphs_do_not_grow_with_depth():
    shallow, deep = _graphs_of_a_compiled_run(3), _graphs_of_a_compiled_run(6)
    torch._dynamo.reset()
    # full-step block, recording block, pruned block (plain and last layouts) and selection
    # phases: a fixed set, whatever the depth
    assert deep == shallow and shallow <= 12, (shallow, deep)


def test_cat_generation_cfg_shares_the_conditional_selection():
    torch.manual_seed(0)
    model = build_transformer("tiny-sd3")
    apply_cat(model, CATConfig(selection="cat", warmup_steps=2, num_clusters=4, lean=False))
    state = get_patch(model).state
    rows = 4  # two CFG pairs: [uncond, uncond, cond, cond]
    inputs = dict(
        encoder_hidden_states=torch.randn(rows, 9, 64),
        pooled_projections=torch.randn(rows, 64),
        timestep=torch.full((rows,), 500.0),
    )
    with torch.no_grad(), cat_generation(model, 4, cfg=True):
        for _ in range(3):
            model(hidden_states=torch.randn(rows, 16, 16, 16), **inputs)
        assert state.chosen.shape[0] == 2
        assert torch.equal(state.index[:2], state.index[2:])
        assert state.caches.blocks[0].attn.shape[0] == 2  # output caches: conditional rows
        assert state.caches.blocks[0].key.shape[0] == 4  # K/V: every row


def test_census_command_prints_every_phase(capsys):
    import json

    from catpatch.cli import main

    assert main(["census", "--shape", "tiny-sd3", "--size", "128x128", "--json", "--lean"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cache_bytes"] > 0
    for phase in ("full", "record", "pruned", "selection"):
        assert result[phase]["kernels"] > 0 and result[phase]["bytes"] > 0
    assert result["pruned"]["flops"] < result["full"]["flops"]
