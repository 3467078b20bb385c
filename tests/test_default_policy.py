"""The default since 0.5.0, a MACs budget (`CATConfig()` is `CATConfig(macs=0.5)`, chosen by
the defaults rule over the frontier study), as a user meets it: `apply_cat(pipe)` with no config
on each family's pipeline, the commands' defaults, what `cat_stats` says, a schedule too short
for the budget, and an own loop without the step count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generate, make_pipe

from catpatch import CATConfig, apply_cat, cat_generation, cat_stats, remove_cat


def test_every_default_names_the_same_budget():
    from catpatch.cli import build_parser
    from catpatch.cli.common import resolve_cat_options
    from catpatch.config import DEFAULT_MACS

    assert DEFAULT_MACS == 0.5 and CATConfig().macs == DEFAULT_MACS
    assert CATConfig().default_budget and repr(CATConfig()) == "CATConfig(macs=0.5)"
    assert not CATConfig(macs=0.5).default_budget  # named: a run too short for it fails
    assert CATConfig().replace(seed=3).default_budget  # a copy stays the default ...
    assert not CATConfig().replace(macs=0.5).default_budget  # ... unless the budget is named
    parser = build_parser()
    for command in (
        ["demo"],
        ["bench"],
        ["generate", "--model", "toy", "--prompt", "x", "--out", "o"],
    ):
        args = parser.parse_args(command)
        assert args.macs is None and args.selection is None, command  # unset: tell it apart
        resolve_cat_options(args)
        assert args.macs == DEFAULT_MACS, command
    # any manual knob named keeps 0.3.0's manual policy (step reuse), in the library and the CLI
    assert not CATConfig(keep_ratio=0.3).budgeted and CATConfig(keep_ratio=0.3).selection == "step"
    args = parser.parse_args(["demo", "--keep-ratio", "0.3"])
    resolve_cat_options(args)
    assert args.macs is None and args.selection == "step"
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
def test_apply_cat_with_no_config_plans_the_default_budget(family):
    pipe, call = _family_call(family)
    unpatched = generate(pipe, **call)
    with pytest.warns(UserWarning, match="no calibration"):  # a tiny model: the shipped one
        apply_cat(pipe)  # the default
    default = generate(pipe, **call)
    stats = cat_stats(pipe)
    assert stats.config.budgeted and stats.config.macs == 0.5
    assert stats.pruned_steps == 0 and stats.reused_steps == 7  # 14 steps, half computed
    assert [mode for mode, _, _ in stats.per_step[:4]] == ["full"] * 4  # the leading steps
    assert stats.macs <= (0.5 + 0.01) * stats.macs_unpatched
    assert "macs=0.5" in stats.summary() and "2.00x" in stats.summary()
    assert np.abs(default - unpatched).max() > 1e-4
    remove_cat(pipe)
    assert np.array_equal(generate(pipe, **call), unpatched)


def test_the_default_budget_computes_a_too_short_run_in_full_and_says_so():
    """3 steps at 0.5 pay for one computed step: the default budget warns and computes every
    step (as 0.3.0's default did within its warm-up); the same budget named is an error."""
    pipe = make_pipe("tiny-sd3")
    unpatched = generate(pipe, num_inference_steps=3)
    with pytest.warns(UserWarning, match="no calibration"):
        apply_cat(pipe)
    with pytest.warns(UserWarning, match=r"saves nothing; the default budget \(macs=0.5\)"):
        full = generate(pipe, num_inference_steps=3)
    assert np.array_equal(full, unpatched)
    assert cat_stats(pipe).reused_steps == 0
    with pytest.warns(UserWarning, match="no calibration"):
        apply_cat(pipe, CATConfig(macs=0.5))
    with pytest.raises(ValueError, match="leaves 1 computed step"):
        generate(pipe, num_inference_steps=3)
    remove_cat(pipe)


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
    """`CATConfig(compile="default")` with step reuse: the full steps run the compiled
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


def test_the_commands_name_the_default_budget_when_a_run_is_too_short_for_it():
    from catpatch.cli.budget import check_budget_steps
    from catpatch.cli.common import CommandError

    with pytest.raises(CommandError, match=r"--macs 0.5 \(the default budget\) at 3 steps"):
        check_budget_steps(CATConfig().macs, 3)
    with pytest.raises(CommandError, match=r"--macs 0.4 at 3 steps"):
        check_budget_steps(0.4, 3)
    check_budget_steps(CATConfig().macs, 4)  # 2 computed steps: enough
