"""PixArt-Σ: the pruned block against diffusers' `BasicTransformerBlock`, the pipeline
three-way comparison, CFG, resolution binning, interop (LoRA, offload, compile), guards and cost.

Mirrors the SD3 tests level by level (test_block, test_pipeline, test_interop, test_compile,
test_guards, test_stats) on a tiny `PixArtSigmaPipeline` built offline.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_pipe
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats, remove_cat
from catpatch.caches import BlockCache, StepIndex, gather_tokens
from catpatch.models.shapes import build_transformer
from catpatch.patching import get_patch
from catpatch.pixart import PixArtDims, cat_block_forward
from catpatch.pixart.adapter import _noise_channels
from catpatch.stats import count_cpu_attention

SHAPE = "tiny-pixart-sigma"
CFG = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8)
EXACT = CFG.replace(keep_ratio=1.0)
TOL = dict(atol=2e-5, rtol=1e-4)


def pixart(seed: int = 0):
    return make_pipe(SHAPE, seed=seed)


def generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    """Images as float arrays: 128x128, 10 steps, no resolution binning unless asked."""
    args = dict(
        prompt="a red circle", height=128, width=128, num_inference_steps=10,
        use_resolution_binning=False, clean_caption=False, output_type="np",
    )  # fmt: skip
    args.update(kwargs)
    return pipe(**args, generator=torch.Generator().manual_seed(seed)).images


def _instance_state(pipe) -> dict:
    modules = dict(pipe.transformer.named_modules())
    return {
        "pipe": set(vars(pipe)),
        "modules": {k: set(vars(m)) for k, m in modules.items()},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks)) for k, m in modules.items()
        },
        "forward": {k: vars(m).get("forward") for k, m in modules.items()},
    }


# ---- tensors ----------------------------------------------------------------------------------
def test_noise_channels_are_what_the_pipeline_keeps():
    """The drift reads per token exactly the values the pipeline keeps of a learned-sigma
    output: unpatchify (diffusers' einsum) then the first C of 2·C channels."""
    rows, h, w, p, c = 2, 3, 5, 2, 4
    output = torch.randn(rows, h * w, p * p * 2 * c)
    image = torch.einsum("nhwpqc->nchpwq", output.view(rows, h, w, p, p, 2 * c))
    kept = image.reshape(rows, 2 * c, h * p, w * p).chunk(2, dim=1)[0]
    noise = _noise_channels(output, p, c)
    again = torch.einsum("nhwpqc->nchpwq", noise.reshape(rows, h, w, p, p, c))
    assert torch.equal(again.reshape(rows, c, h * p, w * p), kept)


# ---- the pruned block against diffusers' BasicTransformerBlock -------------------------------
def _scatter(x, index, values):
    out = x.clone()
    for r in range(x.shape[0]):
        out[r, index[r]] = values[r]
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_pruned_block_equals_basic_transformer_block_on_cached_kv(masked):
    torch.manual_seed(0)
    model = build_transformer(SHAPE)
    block = model.transformer_blocks[1]
    rows, tokens, text, dim, budget = 2, 64, 7, 32, 19
    h0, ctx = torch.randn(rows, tokens, dim), torch.randn(rows, text, dim)
    temb = torch.randn(rows, 6 * dim)
    mask = None
    if masked:  # the pipeline's T5 padding mask, as the transformer turns it into a bias
        keep = torch.ones(rows, text)
        keep[0, 5:] = 0
        mask = ((1 - keep) * -10000.0).unsqueeze(1)
    kwargs = dict(encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=temb)
    cache = BlockCache()
    with torch.no_grad():
        # recording step (all tokens): fills the caches, equals the block itself
        ref = block(h0, **kwargs)
        out = cat_block_forward(block, cache, h0, ctx, temb, mask)
        torch.testing.assert_close(out, ref, **TOL)
        assert cache.kv.shape == (2, rows, tokens, dim)
        old = copy.deepcopy(cache)

        # pruned step: new values for a different subset of tokens in each row
        index = torch.stack([torch.randperm(tokens)[:budget].sort().values for _ in range(rows)])
        h1 = _scatter(h0, index, torch.randn(rows, budget, dim))
        residual = h1.clone()
        step = StepIndex.of(index, tokens, 0)
        got = cat_block_forward(
            block, cache, gather_tokens(h1, index), ctx, temb, mask, step=step, residual=residual
        )
        # the real block on the mixed input: unselected tokens keep h0, so their K/V are
        # exactly the cached ones
        ref = block(h1, **kwargs)
    torch.testing.assert_close(got, gather_tokens(ref, index), **TOL)
    check = BlockCache()
    with torch.no_grad():
        cat_block_forward(block, check, h1, ctx, temb, mask)
    torch.testing.assert_close(cache.kv, check.kv, **TOL)  # K/V of h1 for every token
    # dense residual stream: computed tokens equal the block output; the others add their
    # cached self-attention, cross-attention and FFN outputs under this step's gates
    torch.testing.assert_close(gather_tokens(residual, index), got, **TOL)
    gates = (block.scale_shift_table[None] + temb.reshape(rows, 6, -1)).chunk(6, dim=1)
    expected = h1 + gates[2] * old.attn + old.attn2 + gates[5] * old.ff
    unselected = torch.ones(rows, tokens, dtype=torch.bool)
    for r in range(rows):
        unselected[r, index[r]] = False
    torch.testing.assert_close(residual[unselected], expected[unselected], **TOL)


def test_all_tokens_selected_is_the_block_bit_for_bit():
    torch.manual_seed(0)
    block = build_transformer(SHAPE).transformer_blocks[0]
    rows, tokens, dim = 2, 48, 32
    h, ctx, temb = torch.randn(rows, tokens, dim), torch.randn(rows, 5, dim), torch.randn(2, 192)
    cache = BlockCache()
    with torch.no_grad():
        cat_block_forward(block, cache, h, ctx, temb)
        index = torch.arange(tokens).expand(rows, tokens)
        got = cat_block_forward(block, cache, h, ctx, temb, step=StepIndex.of(index, tokens, 0))
        ref = block(h, encoder_hidden_states=ctx, timestep=temb)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


# ---- the whole pruned step against a literal reading of the specification -------------------
def _attention(q, k, v, heads):
    """softmax(QK^T / sqrt(d)) V per head, written out (independent of SDPA)."""
    rows, nq, dim = q.shape
    q, k, v = (t.view(rows, -1, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(rows, nq, dim)


def _literal_step(model, caches, index, latents, context, timestep):
    """Spec §3 on PixArt, literally: every token walks the residual stream of every block;
    only T_s gets self-attention Q/K/V, cross-attention and FFN; the others read the per-block
    output caches (self-attention, cross-attention, FFN), which this updates in place."""
    rows = latents.shape[0]
    h = model.pos_embed(latents)
    temb, embedded = model.adaln_single(
        timestep, {"resolution": None, "aspect_ratio": None}, batch_size=rows,
        hidden_dtype=h.dtype,
    )  # fmt: skip
    c = model.caption_projection(context)
    for block, cache in zip(model.transformer_blocks, caches, strict=True):
        table = block.scale_shift_table[None] + temb.reshape(rows, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.chunk(6, dim=1)
        n = gather_tokens(block.norm1(h) * (1 + scale_msa) + shift_msa, index)
        attn = block.attn1
        keys = _scatter(cache.kv[0], index, attn.to_k(n))
        values = _scatter(cache.kv[1], index, attn.to_v(n))
        out = attn.to_out[0](_attention(attn.to_q(n), keys, values, attn.heads))
        cache.attn = _scatter(cache.attn, index, out)
        h = h + gate_msa * cache.attn
        q = block.attn2.to_q(gather_tokens(h, index))
        k, v = block.attn2.to_k(c), block.attn2.to_v(c)
        cross = block.attn2.to_out[0](_attention(q, k, v, block.attn2.heads))
        cache.attn2 = _scatter(cache.attn2, index, cross)
        h = h + cache.attn2
        m = gather_tokens(block.norm2(h) * (1 + scale_mlp) + shift_mlp, index)
        cache.ff = _scatter(cache.ff, index, block.ff(m))
        h = h + gate_mlp * cache.ff
    return h, embedded


def test_pruned_step_matches_literal_spec():
    """A whole pruned call (no CFG: every row selects its own tokens, --no-lean): the dense
    stream reaching norm_out, the raw projection and the returned output (computed tokens from
    this step, the others from the previous one) match the literal spec; the caches are
    updated as it updates them."""
    torch.manual_seed(1)
    model = build_transformer(SHAPE)
    apply_cat(model, CFG.replace(warmup_steps=3, num_clusters=6, lean=False))
    state = get_patch(model).state
    rows = 3
    inputs = dict(
        encoder_hidden_states=torch.randn(rows, 9, 64),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    seen, finals = {}, []
    model.norm_out.register_forward_pre_hook(lambda m, a: seen.update(dense=a[0].clone()))
    model.proj_out.register_forward_hook(lambda m, a, o: seen.update(raw=o.clone()), prepend=True)
    model.proj_out.register_forward_hook(lambda m, a, o: finals.append(o.clone()))
    with torch.no_grad(), cat_generation(model):
        for step in range(5):
            latents = torch.randn(rows, 4, 16, 16)
            timestep = torch.full((rows,), 900 - 150 * step)
            if step == 4:
                caches = copy.deepcopy(state.caches.blocks)
                index = state.schedule.rows_of(state.chosen).clone()
            model(hidden_states=latents, timestep=timestep, **inputs)
            if step == 4:
                after = [copy.copy(c) for c in state.caches.blocks]
        dense, embedded = _literal_step(
            model, caches, index, latents, inputs["encoder_hidden_states"], timestep
        )
    torch.testing.assert_close(seen["dense"], dense, atol=1e-4, rtol=1e-4)
    shift, scale = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
    raw = model.proj_out(model.norm_out(dense) * (1 + scale) + shift)
    torch.testing.assert_close(seen["raw"], raw, atol=1e-4, rtol=1e-4)
    expected = _scatter(finals[3], index, gather_tokens(raw, index))
    torch.testing.assert_close(finals[4], expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(finals[4], raw)
    for got, want in zip(after, caches, strict=True):
        for name in ("attn", "attn2", "ff"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), **TOL)


# ---- the pipeline: three-way, CFG, resolutions ------------------------------------------------
@pytest.fixture
def pipe():
    return pixart()


def test_three_way(pipe):
    a = generate(pipe)
    before = _instance_state(pipe)
    apply_cat(pipe, EXACT)
    exact = generate(pipe)
    assert cat_stats(pipe).pruned_steps == 6
    apply_cat(pipe, CFG)
    b = generate(pipe)
    stats = cat_stats(pipe)
    remove_cat(pipe)
    c = generate(pipe)
    assert np.array_equal(a, c), "removed patch must give the unpatched image bit for bit"
    assert _instance_state(pipe) == before, "remove_cat left something behind"
    np.testing.assert_allclose(exact, a, atol=1e-5)
    change = np.abs(a - b).max()
    assert 1e-4 < change < 0.05, f"pruned image differs by {change}"
    assert (stats.steps, stats.pruned_steps, stats.rows) == (10, 6, 2)
    assert (stats.tokens, stats.budget, stats.text_tokens) == (256, 76, 300)
    assert stats.computed_fraction < 1.0 and stats.macs < stats.macs_unpatched


@pytest.mark.parametrize("lean", [True, False])
def test_pruned_latents_stay_close(pipe, lean):
    """Pruned at 0.3, the final latents move by a few percent at most (random weights: a
    closeness check, not a quality claim)."""
    a = generate(pipe, output_type="latent")
    apply_cat(pipe, CFG.replace(lean=lean))
    b = generate(pipe, output_type="latent")
    change = ((b - a).norm() / a.norm()).item()
    assert 1e-4 < change < 0.05, change


def test_cfg_pair_shares_the_conditional_selection(pipe):
    apply_cat(pipe, CFG)
    state, seen = get_patch(pipe).state, {}

    def grab(i, t, latents):  # PixArt's (older) step callback
        if state.index is not None:
            seen["index"] = state.index.clone()

    generate(pipe, prompt=["a red circle", "a green star"], callback=grab)
    index = seen["index"]
    assert index.shape == (4, 76) and state.schedule.cfg_rows is True
    assert torch.equal(index[0], index[2]) and torch.equal(index[1], index[3])
    assert not torch.equal(index[2], index[3])
    # without guidance: one row per image, each selecting on its own
    generate(pipe, prompt=["a red circle", "a green star"], guidance_scale=1.0, callback=grab)
    assert seen["index"].shape == (2, 76) and state.schedule.cfg_rows is False
    assert cat_stats(pipe).rows == 2 and cat_stats(pipe).pruned_steps == 6


def test_batches_are_per_sample(pipe):
    apply_cat(pipe, CFG)
    prompts = ["a red circle", "a blue square on a striped background"]
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    ab = generate(pipe, prompt=prompts, latents=latents)
    assert cat_stats(pipe).rows == 4
    ba = generate(pipe, prompt=prompts[::-1], latents=latents.flip(0))
    np.testing.assert_allclose(ab[0], ba[1], atol=2e-5)
    np.testing.assert_allclose(ab[1], ba[0], atol=2e-5)


@pytest.mark.parametrize("height,width", [(128, 192), (192, 128)])
def test_non_square_and_resolution_change(pipe, height, width):
    apply_cat(pipe, CFG)
    img = generate(pipe, height=height, width=width)
    assert img.shape == (1, height, width, 3)
    assert cat_stats(pipe).tokens == (height // 8) * (width // 8)
    img = generate(pipe, height=width, width=height)  # the same patched pipe, another shape
    assert img.shape == (1, width, height, 3) and cat_stats(pipe).pruned_steps == 6
    assert np.isfinite(img).all()


def test_resolution_binning(pipe):
    """`use_resolution_binning` (the pipeline's default): the latents take the closest bin's
    shape (here 176x352 for a 1:2 request) and the image is resized back; the token grid comes
    from the call, so CAT follows."""
    kwargs = dict(height=160, width=320, use_resolution_binning=True, num_inference_steps=8)
    a = generate(pipe, **kwargs)
    apply_cat(pipe, CFG)
    b = generate(pipe, **kwargs)
    stats = cat_stats(pipe)
    remove_cat(pipe)
    assert a.shape == b.shape == (1, 160, 320, 3)
    assert stats.tokens == (176 // 8) * (352 // 8) and stats.pruned_steps == 4
    assert np.isfinite(b).all() and np.abs(a - b).max() > 1e-4
    np.testing.assert_array_equal(generate(pipe, **kwargs), a)


@pytest.mark.parametrize(
    "changes", [dict(selection="step"), dict(selection="cat+reuse"), dict(token_order=1)]
)
def test_other_policies_run(pipe, changes):
    """Step reuse, CAT with reused steps and the first-order token forecast on PixArt."""
    a = generate(pipe, num_inference_steps=14)
    apply_cat(pipe, CFG.replace(**changes))
    b = generate(pipe, num_inference_steps=14)
    stats = cat_stats(pipe)
    assert np.isfinite(b).all() and np.abs(a - b).max() > 1e-5 and stats.steps == 14
    if "selection" in changes:
        assert stats.reused_steps > 0 and stats.macs_ratio < 1
    else:
        assert stats.pruned_steps == 10


def test_save_load_and_offline_folder(pipe, tmp_path):
    """A saved tiny PixArt-Σ folder loads with `DiffusionPipeline` and takes CAT."""
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    apply_cat(loaded, CFG)
    assert generate(loaded).shape == (1, 128, 128, 3) and cat_stats(loaded).pruned_steps == 6


def test_bad_input_leaves_pipe_untouched(pipe):
    from diffusers import PixArtAlphaPipeline
    from diffusers.models.attention_processor import AttnProcessor

    before = _instance_state(pipe)
    with pytest.raises(TypeError, match="CATConfig"):
        apply_cat(pipe, {"keep_ratio": 0.3})
    with pytest.raises(ValueError, match="keep_ratio"):
        apply_cat(pipe, CATConfig(selection="cat", keep_ratio=1.5))
    alpha = PixArtAlphaPipeline(**pipe.components)
    with pytest.raises(TypeError, match="PixArtSigmaPipeline"):
        apply_cat(alpha, CFG)
    from diffusers import PixArtSigmaPAGPipeline

    pag = PixArtSigmaPAGPipeline(**pipe.components)
    with pytest.raises(TypeError, match="CAT does not support PixArtSigmaPAGPipeline: perturbed"):
        apply_cat(pag, CFG)
    assert _instance_state(pipe) == before
    processors = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor(AttnProcessor())
    with pytest.raises(TypeError, match=r"set_attn_processor\(AttnProcessor2_0\(\)\)"):
        apply_cat(pipe, CFG)
    assert get_patch(pipe) is None
    pipe.transformer.set_attn_processor(dict(processors))
    apply_cat(pipe, CFG)
    with pytest.raises(ValueError, match="num_clusters=300 exceeds the 256 image tokens"):
        generate(pipe) if apply_cat(pipe, CFG.replace(num_clusters=300)) else None
    state = get_patch(pipe).state
    assert not state.schedule.in_run and state.cache_bytes() == 0


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
    """diffusers' model offload hooks (accelerate) next to ours; on this CPU-only machine the
    execution device is the CPU, so this checks that the hooks compose and results hold."""
    reference = pixart()
    apply_cat(reference, CFG)
    expected = generate(reference)
    pipe = pixart()
    if order == "offload_first":
        pipe.enable_model_cpu_offload(device="cpu")
        apply_cat(pipe, CFG)
    else:
        apply_cat(pipe, CFG)
        pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(generate(pipe), expected, atol=1e-5)
    assert cat_stats(pipe).pruned_steps == 6
    remove_cat(pipe)
    np.testing.assert_allclose(generate(pipe), generate(pixart()), atol=1e-5)


# ---- compile and host syncs -------------------------------------------------------------------
def _model_inputs(rows: int, text: int = 9, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        encoder_hidden_states=torch.randn(rows, text, 64, generator=gen),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


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


def test_pruned_block_compiles_as_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = build_transformer(SHAPE).transformer_blocks[1]
    rows, tokens, dim = 2, 64, 32
    h, ctx, temb = torch.randn(rows, tokens, dim), torch.randn(rows, 7, dim), torch.randn(2, 192)
    index = torch.stack([torch.randperm(tokens)[:19].sort().values for _ in range(rows)])
    caches = [BlockCache(), BlockCache()]
    with torch.no_grad():
        for cache in caches:
            cat_block_forward(block, cache, h, ctx, temb)
        compiled = torch.compile(cat_block_forward, fullgraph=True, dynamic=False)
        h1 = torch.randn(rows, tokens, dim)
        args = (gather_tokens(h1, index), ctx, temb)
        step = StepIndex.of(index, tokens, 0)
        eager = cat_block_forward(block, caches[0], *args, step=step, residual=h1.clone())
        graph = compiled(block, caches[1], *args, step=step, residual=h1.clone())
    torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].kv, caches[0].kv, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("cfg,lean", [(True, True), (True, False), (False, True)])
def test_pruned_step_has_no_host_sync(cfg, lean):
    """A whole pruned transformer call (hooks, pruned blocks, output replacement, the next
    selection) reads no tensor value on the host."""
    from test_guards import NoHostSync

    torch.manual_seed(0)
    model = build_transformer(SHAPE)
    apply_cat(
        model, CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=2, num_clusters=4, lean=lean)
    )
    rows, steps = 2, 5
    inputs = _model_inputs(rows)
    with torch.no_grad(), cat_generation(model, num_inference_steps=steps, cfg=cfg):
        for step in range(steps):
            latents = torch.randn(rows // 2 if cfg else rows, 4, 16, 16)
            args = dict(
                hidden_states=torch.cat([latents] * 2) if cfg else latents,
                timestep=torch.full((rows,), 900 - 100 * step),
                **inputs,
            )
            if step < 2:
                model(**args)  # warm-up: clustering and set-up may sync
                continue
            with NoHostSync():
                model(**args)
    assert cat_stats(model).pruned_steps == 3


# ---- cost model -------------------------------------------------------------------------------
def test_cat_stats_against_hand_calculation(pipe):
    apply_cat(pipe, CFG.replace(lean=False))
    generate(pipe)
    stats = cat_stats(pipe)
    assert (stats.steps, stats.pruned_steps, stats.tokens, stats.budget) == (10, 6, 256, 76)
    # tiny-pixart-sigma by hand: D=32, 3 blocks, patch 2, 4 latent channels in, 8 out,
    # T5 width 64, T=300 text tokens, L=256, S=76
    D, L, T, S = 32, 256, 300, 76
    outer = L * 4 * 4 * D + T * (64 * D + D * D) + 256 * D + D * D + 6 * D * D

    def block(n):
        return 4 * D * D * n + 2 * D * n * L + 2 * D * D * n + 2 * D * D * T + 2 * D * n * T \
            + 8 * D * D * n  # fmt: skip

    full = outer + L * D * 4 * 8 + 3 * block(L)
    pruned = outer + L * D * 4 * 8 + 3 * block(S)
    assert stats.macs_unpatched == 2 * 10 * full
    assert stats.macs == 2 * (4 * full + 6 * pruned)
    apply_cat(pipe, CFG)  # lean: proj_out on the computed tokens only
    generate(pipe)
    lean = outer + S * D * 4 * 8 + 3 * block(S)
    assert cat_stats(pipe).macs == 2 * (4 * full + 6 * lean)


count_cpu_attention()


@pytest.mark.parametrize("masked", [False, True])
def test_macs_match_flop_counter(masked):
    torch.manual_seed(0)
    model = build_transformer(SHAPE)
    config = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=2, num_clusters=4)
    apply_cat(model, config)
    rows, text = 2, 40
    inputs = _model_inputs(rows, text)
    if masked:
        inputs["encoder_attention_mask"] = torch.ones(rows, text)
    latents, timestep = torch.randn(rows, 4, 32, 32), torch.full((rows,), 500)
    dims, tokens = PixArtDims.from_config(model.config), 16 * 16
    counted = []
    with torch.no_grad(), cat_generation(model):
        for _ in range(3):
            with FlopCounterMode(display=False) as counter:
                model(hidden_states=latents, timestep=timestep, **inputs)
            counted.append(counter.get_total_flops() / 2)
    full = rows * dims.step_macs(tokens, text)
    pruned = rows * dims.step_macs(tokens, text, config.budget(tokens), config.lean)
    steps = zip(("reference", "recording", "pruned"), counted, (full, full, pruned), strict=True)
    for step, got, model_macs in steps:
        assert got / model_macs == pytest.approx(1.0, abs=0.01), f"{step}: {got / model_macs}"
    assert counted[2] < 0.6 * counted[0]


def test_pixart_sigma_headline_ratio():
    """PixArt-Σ at 1024² (L=4096, T=300), α 0.3, t0 8, CFG pair: MACs and bound."""
    from catpatch.models.shapes import SHAPES
    from catpatch.stats import run_macs

    dims = PixArtDims.from_config(SHAPES["pixart-sigma"])
    budget = CATConfig(selection="cat").budget(4096)
    cut, full = run_macs(dims, 2, 4096, 300, budget, 28, 20)
    assert 0.45 < cut / full < 0.55
    assert dims.run_bound(28, 8, 4096, 300, budget) == pytest.approx(full / cut)


# ---- commands: census, bench ------------------------------------------------------------------
@pytest.fixture(scope="module")
def sigma_census():
    from catpatch.census import census

    return {
        lean: census("pixart-sigma", 1024, 1024, CATConfig(selection="cat", lean=lean))
        for lean in (True, False)
    }


def test_census_at_pixart_sigma_1024(sigma_census):
    """The real PixArt-Σ shape at 1024² (L=4096, T=300, CFG pair, bf16) on the meta device:
    the default (lean) pruned step launches no more kernels than a full step and moves at most
    0.40 of its non-GEMM bytes."""
    lean, exact = sigma_census[True], sigma_census[False]
    for c in (lean, exact):
        assert 0.29 < c.pruned.flops / c.full.flops < 0.32
        assert c.selection.kernels <= 37
        assert c.pruned.ops["index_copy_"] >= 28 + 1  # one K/V write per block, the output
    assert lean.pruned.kernels <= lean.full.kernels
    assert lean.pruned.other_bytes <= 0.40 * lean.full.other_bytes
    # --no-lean keeps three output caches per block and the dense stream: reported, not a target
    assert exact.pruned.other_bytes <= 0.50 * exact.full.other_bytes
    assert lean.cache_bytes < exact.cache_bytes < 2e9


def test_bench_pixart_json(capsys):
    import json

    from catpatch.cli import main

    code = main([
        "bench", "--shape", "tiny-pixart-sigma", "--size", "128x128", "--steps", "6",
        "--warmup-steps", "3", "--num-clusters", "8", "--repeats", "1", "--text-tokens", "16",
        "--device", "cpu", "--json",
    ])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 64 and result["budget"] == 19 and result["rows"] == 2
    assert result["speedup"] > 0 and result["bound"] > 1.0 and 0.3 < result["macs_ratio"] < 1.0


def test_generate_command_takes_a_pixart_sigma_folder(tmp_path, capsys):
    """`catpatch generate --model FOLDER` with a saved PixArt-Σ pipeline: images, CAT figures
    in the manifest (the pipeline bins 128x128 to its 256x256 bin: L = (256/4/2)² tokens)."""
    import json

    from catpatch.cli import main

    pixart().save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = main([
        "generate", "--model", str(tmp_path / "model"), "--prompt", "a red circle",
        "--size", "128x128", "--steps", "6", "--warmup-steps", "2", "--num-clusters", "4",
        "--out", str(out), "--device", "cpu", "--selection", "cat",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert (out / record["file"]).is_file()
    assert record["cat"] | {"steps": 6, "pruned_steps": 4, "L": 1024, "T": 300} == record["cat"]
