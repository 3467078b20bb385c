"""CATConfig validation/repr, the reversible patch engine on dummy modules, bare transformers."""

from __future__ import annotations

import warnings

import pytest
import torch

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats, is_patched, remove_cat
from catpatch.hooks import PatchSet
from catpatch.models.shapes import build_transformer
from catpatch.patching import get_patch


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("keep_ratio", 0.0, "keep_ratio"),
        ("keep_ratio", 1.01, "keep_ratio"),
        ("keep_ratio", "0.3", "must be a number"),
        ("warmup_steps", 1, "warmup_steps"),
        ("warmup_steps", 8.0, "must be an int"),
        ("num_clusters", 0, "num_clusters"),
        ("recency_decay", 1.0, "recency_decay"),
        ("cluster_fraction", -0.1, "cluster_fraction"),
        ("selection", "greedy", "one of"),
        ("cfg_selection", "both", "one of"),
        ("kmeans_iters", 0, "kmeans_iters"),
        ("keep_ratio", float("nan"), "finite"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        CATConfig(**{field: value})


def test_config_repr_presets_and_budget():
    assert repr(CATConfig()) == "CATConfig(macs=0.5)"  # the default budget
    assert repr(CATConfig(warmup_steps=8)) == "CATConfig(keep_ratio=0.3, warmup_steps=8)"
    assert repr(CATConfig(selection="cat")).endswith("warmup_steps=8, selection='cat')")
    assert repr(CATConfig(num_clusters=12, selection="stale")) == (
        "CATConfig(keep_ratio=0.3, warmup_steps=8, num_clusters=12, selection='stale')"
    )
    paper = CATConfig.paper()
    assert (paper.keep_ratio, paper.warmup_steps, paper.num_clusters) == (0.3, 8, 20)
    assert paper.selection == "paper" and CATConfig.paper(keep_ratio=0.5).keep_ratio == 0.5
    assert (
        CATConfig(selection="cat").budget(4096) == 1228
        and CATConfig(selection="cat", keep_ratio=1.0).budget(10) == 10
    )
    with pytest.raises(ValueError):
        CATConfig(selection="cat").replace(keep_ratio=2.0)


class Dummy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x)


def test_patch_set_restores_instances_exactly():
    m = Dummy()
    before = dict(vars(m))
    x = torch.randn(2, 3)
    ref = m(x)
    patches = PatchSet()
    patches.set_attribute(m, "forward", lambda x: ref * 0 + 1)
    patches.add_handle(m.lin.register_forward_hook(lambda mod, a, o: o * 2))
    assert torch.equal(m(x), torch.ones_like(ref))
    assert len(patches) == 2
    patches.undo()
    assert dict(vars(m)) == before and "forward" not in vars(m)
    assert torch.equal(m(x), ref) and not m.lin._forward_hooks
    # an instance attribute that existed before is put back, not deleted
    m.forward = m.forward
    existing = vars(m)["forward"]
    patches.set_attribute(m, "forward", lambda x: x)
    patches.undo()
    assert vars(m)["forward"] is existing


def test_policy_registered_after_import_is_a_selection(monkeypatch):
    """`CATConfig` validates `selection` against the registry as it is now, so a policy
    registered after import is accepted and runs; an unknown name lists the registered ones."""
    from catpatch import policies
    from catpatch.policies.stale import StalePolicy

    monkeypatch.setattr(policies, "REGISTRY", dict(policies.REGISTRY))  # undone after the test

    class LowestIndexFirst(StalePolicy):
        """Round robin by recency, ties to the lowest index: a stand-in for a user's policy."""

        name = "mine"

    with pytest.raises(ValueError, match=r"registered policies \('cat', .*'cat\+reuse'\)"):
        CATConfig(selection="mine")
    policies.register("mine", LowestIndexFirst)
    config = CATConfig(keep_ratio=0.3, warmup_steps=2, selection="mine")
    with pytest.raises(ValueError, match="already registered"):
        policies.register("mine", StalePolicy)
    with pytest.raises(TypeError, match="TokenPolicy"):
        policies.register("other", object)
    with pytest.raises(ValueError, match=r"registered policies .*'mine'"):
        CATConfig(selection="greedy")
    model = apply_cat(build_transformer("tiny-sd3"), config)
    assert isinstance(get_patch(model).state.tokens, LowestIndexFirst)
    with torch.no_grad(), cat_generation(model, num_inference_steps=4):
        for _ in range(4):
            model(hidden_states=torch.randn(2, 16, 16, 16), **_bare_inputs(seed=0))
    assert cat_stats(model).pruned_steps == 2


def _bare_inputs(rows=2, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return dict(
        encoder_hidden_states=torch.randn(rows, 9, 64),
        pooled_projections=torch.randn(rows, 64),
        timestep=torch.full((rows,), 700.0),
    )


def test_bare_transformer_with_own_loop():
    torch.manual_seed(0)
    model = build_transformer("tiny-sd3")
    assert (
        apply_cat(model, CATConfig(selection="cat", keep_ratio=0.3, warmup_steps=2, num_clusters=4))
        is model
    )
    inputs, latents = _bare_inputs(), torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        ref = model(hidden_states=latents, **inputs).sample  # outside a run: unpruned + warning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(hidden_states=latents, **inputs)
        assert not caught, "the outside-a-run warning repeats"
        steps = [latents + 0.1 * i * torch.randn_like(latents) for i in range(5)]
        with cat_generation(model, num_inference_steps=5):
            outs = [model(hidden_states=x, **inputs).sample for x in steps]
        unpatched = [model(hidden_states=x, **inputs).sample for x in steps]
    stats = cat_stats(model)
    assert stats.steps == 5 and stats.pruned_steps == 3 and stats.passthrough_calls == 0
    torch.testing.assert_close(outs[0], ref)
    torch.testing.assert_close(outs[1], unpatched[1])  # warm-up steps are the model
    assert not torch.allclose(outs[4], unpatched[4], atol=1e-4)  # pruned steps are not
    assert is_patched(model)
    remove_cat(model)
    assert not is_patched(model)
    with torch.no_grad():
        torch.testing.assert_close(model(hidden_states=latents, **inputs).sample, ref)


@pytest.mark.parametrize("config", [
    CATConfig(selection="cat", warmup_steps=2, num_clusters=4),
    CATConfig(selection="cat", warmup_steps=2, persistent_buffers=True),
    CATConfig(warmup_steps=2, selection="step"),
])  # fmt: skip
def test_outside_a_run_warns_once_and_runs_unpruned(config):
    model = build_transformer("tiny-sd3")
    with torch.no_grad():
        ref = model(hidden_states=torch.ones(2, 16, 16, 16), **_bare_inputs(seed=1)).sample
    apply_cat(model, config)
    with pytest.warns(UserWarning, match="cat_generation"), torch.no_grad():
        out = model(hidden_states=torch.ones(2, 16, 16, 16), **_bare_inputs(seed=1)).sample
    torch.testing.assert_close(out, ref)
    assert cat_stats(model).passthrough_calls == 0 and cat_stats(model).steps == 0


def test_cat_generation_needs_a_patch():
    model = build_transformer("tiny-sd3")
    with pytest.raises(ValueError, match="apply_cat"), cat_generation(model):
        pass
