"""Every model catpatch ships or builds loads the one documented way (`catpatch.models`), and
the shipped trained models also from their own packages; the packages hold only their own
parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import catpatch
from catpatch import models, trained

PACKAGE = Path(catpatch.__file__).parent


@pytest.mark.parametrize("name", models.names())
def test_every_named_model_loads_and_generates_the_documented_way(name):
    pipe = models.load_pipeline(name)
    call = models.call_kwargs(name) | {"num_inference_steps": 2}
    images = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np",
                  **call).images  # fmt: skip
    assert images.shape == (1, call["height"], call["width"], 3) and np.isfinite(images).all()


def test_names_cover_the_trained_and_the_tiny_families():
    names = models.names()
    assert names[:2] == ("toy", "scenes")
    assert {"tiny-sd3", "tiny-flux", "tiny-pixart-sigma"} <= set(names)
    # the trained models' call settings carry the T5 length they were trained at
    assert models.call_kwargs("toy")["max_sequence_length"] == 16
    assert models.call_kwargs("scenes")["max_sequence_length"] == 24
    with pytest.raises(ValueError, match="no model 'nope'; use one of: toy, scenes"):
        models.load_pipeline("nope")


@pytest.mark.parametrize("name", ["toy", "scenes"])
def test_trained_packages_share_one_surface(name):
    """`catpatch.toy` and `catpatch.scenes` offer the same names (the scenes once raised
    AttributeError on `load_pipeline`), all of them the model's of `catpatch.trained.get`."""
    import importlib

    package = importlib.import_module(f"catpatch.{name}")
    model = trained.get(name)
    assert package.MODEL is model and set(package.__all__) == set(catpatch.toy.__all__)
    assert package.CALL_KWARGS == model.call_kwargs == models.call_kwargs(name)
    assert package.load_pipeline == model.load_pipeline
    assert package.eval_prompts(2) == model.eval_prompts(2)
    with pytest.raises(ValueError, match="use one of 'toy', 'scenes'"):
        trained.get("nope")


def test_model_packages_hold_only_their_own_data_and_weights():
    for name in ("toy", "scenes"):
        modules = sorted(p.name for p in (PACKAGE / name).glob("*.py"))
        assert modules == ["__init__.py", "__main__.py", "build.py", "data.py"], modules
        assert (PACKAGE / name / "weights" / "model_index.json").is_file()
    # neither model builds on the other
    for path in [*(PACKAGE / "scenes").glob("*.py"), *(PACKAGE / "toy").glob("*.py")]:
        other = "toy" if path.parent.name == "scenes" else "scenes"
        assert f"..{other}" not in path.read_text(), path


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}  # fmt: skip
    assert not long, long
