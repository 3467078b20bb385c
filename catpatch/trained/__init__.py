"""The machinery of catpatch's trained SD3 pipelines, shared by every shipped model: what a
model is (`TrainedModel`, `Recipe`), the list of shipped ones and the `--model` lookup
(`model`), its label detector (`detector`), training (`train`), shared architecture (`build`)
and data (`data`) helpers, and the `python -m catpatch.<name>` command line (`cli`).

Each shipped model is a package holding only its own data, architecture and weights
(`catpatch.toy`, `catpatch.scenes`), with a `MODEL` built from this one:

    from catpatch import trained
    model = trained.get("scenes")                   # or "toy"
    pipe = model.load_pipeline()                    # offline, float32 on the CPU
    images = model.generate(pipe, model.eval_prompts(4))   # (4, 96, 96, 3) in [0, 1]
    accuracy = model.check(pipe, n=8)               # detector accuracy against the captions

To load any model catpatch ships or builds (these and the tiny random-weight pipelines) the same
way, see `catpatch.models.load_pipeline`.
"""

from __future__ import annotations

from .model import (
    BUILTIN,
    MODEL_FILE,
    EvalPrompt,
    Recipe,
    TrainedModel,
    builtin_models,
    get,
    trained_model,
)

__all__ = [
    "BUILTIN",
    "MODEL_FILE",
    "EvalPrompt",
    "Recipe",
    "TrainedModel",
    "builtin_models",
    "get",
    "trained_model",
]
