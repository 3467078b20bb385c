"""The error-split tool (issue #12): what each oracle variant makes exactly true, and that the
default CAT path is untouched by it."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES, generate, make_pipe

from catpatch import CATConfig, apply_cat, remove_cat
from catpatch.analysis.error_split import VARIANTS, Oracle, error_split
from catpatch.patching import get_patch

CFG = CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=4, num_clusters=8, lean=False)
STEPS = 10  # 6 pruned steps after a 4-step warm-up


def _latents(pipe, **kwargs) -> torch.Tensor:
    return torch.as_tensor(
        generate(pipe, output_type="latent", num_inference_steps=STEPS, **kwargs)
    )


def _split(pipe, oracle: Oracle, config: CATConfig = CFG, **kwargs):
    with error_split(pipe, config, oracle) as log:
        latents = _latents(pipe, **kwargs)
    return latents, log


def _cat(pipe, config: CATConfig = CFG, **kwargs) -> torch.Tensor:
    apply_cat(pipe, config)
    try:
        return _latents(pipe, **kwargs)
    finally:
        remove_cat(pipe)


@pytest.mark.parametrize("shape", SHAPES[:2])  # SD3 and SD3.5-medium (dual attention)
def test_both_fresh_equals_unpatched(shape):
    """Fresh K/V and fresh outputs: every token's output is the true one at every step, so the
    run is the unpatched one whatever the selection, with or without CFG."""
    pipe = make_pipe(shape)
    for guidance in (7.0, 1.0):
        reference = _latents(pipe, guidance_scale=guidance)
        for true_drift in (False, True):
            oracle = Oracle(fresh_kv=True, fresh_outputs=True, true_drift=true_drift)
            latents, log = _split(pipe, oracle, guidance_scale=guidance)
            torch.testing.assert_close(latents, reference, rtol=1e-5, atol=1e-6)
            assert len(log.steps) == STEPS - CFG.warmup_steps
            assert log.summary()["total"] < 1e-5


def test_no_oracle_is_plain_cat():
    """The oracle pass leaves no trace: with nothing removed the run is CAT's, bit for bit."""
    pipe = make_pipe()
    latents, log = _split(pipe, Oracle())
    assert torch.equal(latents, _cat(pipe))
    split = log.summary()
    assert split["selected"] > 0 and split["unselected"] > split["selected"]
    assert split["drift_input"] > 0


def test_fresh_kv_computes_the_selected_tokens_exactly():
    """Fresh K/V: the selected tokens' outputs are the full model's at each step (only the
    unselected tokens' stale outputs are wrong); the caches stay where they were."""
    pipe = make_pipe("tiny-sd3.5-medium")
    addresses = []

    with error_split(pipe, CFG, Oracle(fresh_kv=True)) as log:
        state = get_patch(pipe).state
        finish = state.finish_call

        def spy(mode):
            if state.caches.blocks[0].key is not None:
                addresses.append([t.data_ptr() for c in state.caches.blocks for t in c.tensors()])
            finish(mode)

        state.finish_call = spy
        _latents(pipe)
    assert len(log.steps) == STEPS - CFG.warmup_steps
    for step in log.steps:
        assert step.selected <= 1e-10 * step.reference
        assert step.unselected > 1e-4 * step.reference
    assert all(a == addresses[0] for a in addresses), "a cache moved"


def test_fresh_outputs_leave_only_the_selected_tokens_error():
    """Fresh outputs: the unselected tokens give their true output; the selected ones are
    still computed against stale K/V (the oracle pass must not have refreshed it)."""
    pipe = make_pipe()
    latents, log = _split(pipe, Oracle(fresh_outputs=True))
    for step in log.steps:
        assert step.unselected == 0.0
    assert all(s.selected > 0 for s in log.steps[1:]), "stale K/V was refreshed"
    # with fresh K/V as well the selected tokens are exact: fresh outputs alone is not that
    both, _ = _split(pipe, Oracle(fresh_kv=True, fresh_outputs=True))
    assert (latents - both).abs().max() > 1e-5


def test_true_drift_feeds_the_policy_the_true_output():
    pipe = make_pipe()
    latents, log = _split(pipe, Oracle(true_drift=True))
    assert log.summary()["drift_input"] == 0.0
    assert not torch.equal(latents, _cat(pipe)), "the selection did not change"


def test_default_path_unaffected_after_use():
    """Using the tool leaves the pipeline unpatched, with no instance attribute of its own,
    and plain CAT gives the same images as before it."""
    pipe = make_pipe()
    before = _cat(pipe)
    modules = {name: set(vars(m)) for name, m in pipe.transformer.named_modules()}
    for oracle in VARIANTS[1:3]:
        _split(pipe, oracle)
    assert get_patch(pipe) is None
    assert {name: set(vars(m)) for name, m in pipe.transformer.named_modules()} == modules
    assert torch.equal(_cat(pipe), before)


def test_removed_after_an_error():
    pipe = make_pipe()
    with pytest.raises(RuntimeError, match="boom"), error_split(pipe, CFG, Oracle(fresh_kv=True)):
        raise RuntimeError("boom")
    assert get_patch(pipe) is None


@pytest.mark.parametrize(
    "config, message",
    [
        (CFG.replace(lean=True), "exact, eager"),
        (CFG.replace(selection="step"), "token policy that runs every step"),
        (CFG.replace(selection="cat+reuse"), "token policy that runs every step"),
    ],
)
def test_refuses_what_it_does_not_measure(config, message):
    pipe = make_pipe()
    with pytest.raises(ValueError, match=message), error_split(pipe, config):
        pass
    assert get_patch(pipe) is None


def test_refuses_a_patched_pipeline():
    pipe = make_pipe()
    apply_cat(pipe, CFG)
    with pytest.raises(ValueError, match="remove_cat first"), error_split(pipe, CFG):
        pass
    assert get_patch(pipe).config == CFG, "the user's patch was replaced"
