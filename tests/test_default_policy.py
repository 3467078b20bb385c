"""The default policy since 0.3.0, step reuse (`selection="step"`), as a user meets it:
`apply_cat(pipe)` with no config on each family's pipeline, the commands' defaults, what
`cat_stats` says, and an own loop without the step count."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import generate, make_pipe

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats, remove_cat


def test_every_default_names_the_same_policy():
    from catpatch.cli import build_parser
    from catpatch.cli.bench import BenchSettings
    from catpatch.cli.common import resolve_cat_options
    from catpatch.cli.generate.settings import GenerateSettings

    default = CATConfig().selection
    assert default == "step"
    fields = {f.name: f.default for f in dataclasses.fields(GenerateSettings)}
    assert fields["selection"] == default
    assert {f.name: f.default for f in dataclasses.fields(BenchSettings)}["selection"] == default
    parser = build_parser()
    for command in (
        ["demo"],
        ["bench"],
        ["generate", "--model", "toy", "--prompt", "x", "--out", "o"],
    ):
        args = parser.parse_args(command)
        assert args.selection is None, command  # unset: the commands can tell it was not given
        resolve_cat_options(args)
        assert args.selection == default and args.macs == CATConfig().macs, command
    assert CATConfig.paper().selection == "paper"  # the paper's token pruning: one call


def _family_call(family: str) -> tuple[object, dict]:
    if family == "sd3":
        return make_pipe("tiny-sd3"), dict(num_inference_steps=14)
    if family == "flux":
        args = dict(max_sequence_length=32, guidance_scale=3.5, num_inference_steps=14)
        return make_pipe("tiny-flux"), args
    args = dict(use_resolution_binning=False, clean_caption=False, num_inference_steps=14)
    return make_pipe("tiny-pixart-sigma"), args


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart"])
def test_apply_cat_with_no_config_reuses_whole_steps_at_cats_macs(family):
    pipe, call = _family_call(family)
    unpatched = generate(pipe, **call)
    apply_cat(pipe, CATConfig(selection="cat"))
    generate(pipe, **call)
    cat = cat_stats(pipe)
    apply_cat(pipe)  # the default
    default = generate(pipe, **call)
    stats = cat_stats(pipe)
    assert stats.config.selection == "step"
    assert stats.pruned_steps == 0 and stats.reused_steps > 0
    assert [mode for mode, _, _ in stats.per_step[:8]] == ["full"] * 8  # the warm-up
    one_step = stats.macs_unpatched / 14
    assert abs(stats.macs - cat.macs) <= one_step / 2, "not CAT's MACs"
    assert "selection='step'" in stats.summary() and "skipped" in stats.summary()
    assert np.abs(default - unpatched).max() > 1e-4
    remove_cat(pipe)
    assert np.array_equal(generate(pipe, **call), unpatched)


def test_own_loop_with_the_default_names_the_missing_step_count():
    from catpatch.models.shapes import build_transformer

    model = apply_cat(build_transformer("tiny-sd3"), CATConfig(warmup_steps=2))
    args = dict(
        hidden_states=torch.randn(1, 16, 16, 16),
        encoder_hidden_states=torch.randn(1, 4, 64),
        pooled_projections=torch.randn(1, 64),
        timestep=torch.full((1,), 500.0),
    )
    missing = pytest.raises(ValueError, match="pass num_inference_steps to cat_generation")
    with missing, cat_generation(model):
        model(**args)
    with cat_generation(model, num_inference_steps=6):  # the fix the message names
        for _ in range(6):
            model(**args)
    assert cat_stats(model).reused_steps > 0


def test_compiled_default_matches_eager_and_compiles_once():
    """`CATConfig(compile="default")` with the default policy: the full steps run the compiled
    model, the skipped steps compile nothing, a warm generation recompiles nothing, and the
    images equal eager ones."""
    from torch._dynamo.utils import counters

    from catpatch.patching import get_patch

    pipe = make_pipe("tiny-sd3")
    config = CATConfig(warmup_steps=4)
    apply_cat(pipe, config)
    eager = generate(pipe, num_inference_steps=12)
    apply_cat(pipe, config.replace(compile="default"))
    start = counters["stats"]["unique_graphs"]
    first = generate(pipe, num_inference_steps=12)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > start, "nothing compiled"
    second = generate(pipe, num_inference_steps=12)
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled in a warm generation"
    assert cat_stats(pipe).reused_steps > 0
    np.testing.assert_allclose(first, eager, atol=2e-4)
    np.testing.assert_array_equal(first, second)
    remove_cat(pipe)
    assert get_patch(pipe) is None
