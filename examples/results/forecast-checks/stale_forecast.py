"""Experiment: staleness-only selection with the token forecast, 64 images, 28 steps.

Run from the repository root: python examples/results/forecast-checks/stale_forecast.py
"""

import json

import numpy as np

from catpatch import CATConfig, apply_cat, remove_cat, toy
from catpatch.cli.study import fidelity

pipe = toy.load_pipeline()
prompts = toy.eval_prompts(64)
base = toy.generate(pipe, prompts, batch_size=16)
for keep in (0.2, 0.3, 0.5):
    res = {}
    variants = (
        ("stale", dict(selection="stale")),
        ("stale+forecast", dict(selection="stale", token_order=1)),
    )
    for name, cfg in variants:
        apply_cat(pipe, CATConfig(keep_ratio=keep, lean=False, **cfg))
        res[name] = fidelity(toy.generate(pipe, prompts, batch_size=16), base)[0]
    d = res["stale+forecast"] - res["stale"]
    record = {
        "keep_ratio": keep,
        "stale": res["stale"].mean(),
        "stale_forecast": res["stale+forecast"].mean(),
        "diff": d.mean(),
        "se": d.std(ddof=1) / np.sqrt(len(d)),
    }
    print(json.dumps(record), flush=True)
remove_cat(pipe)
