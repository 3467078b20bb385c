"""Experiment: damped first-order token forecast (slope x d) on the toy, 16 images, 28 steps."""

import sys

import numpy as np
import torch

from catpatch import CATConfig, apply_cat, forecast, remove_cat, toy
from catpatch.cli.study import fidelity

n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
pipe = toy.load_pipeline()
prompts = toy.eval_prompts(n)
base = toy.generate(pipe, prompts, batch_size=16)
orig = forecast.TokenForecast.apply
for keep in (0.2, 0.3):
    apply_cat(pipe, CATConfig(keep_ratio=keep, lean=False))
    zero = fidelity(toy.generate(pipe, prompts, batch_size=16), base)[0]
    for d in (1.0, 0.5, 0.25):

        def apply(self, previous, time, d=d):
            ahead = forecast._column(time) - self.stamp
            return torch.addcmul(previous.float(), self.slope * d, ahead).to(previous.dtype)

        forecast.TokenForecast.apply = apply
        apply_cat(pipe, CATConfig(keep_ratio=keep, token_order=1, lean=False))
        p = fidelity(toy.generate(pipe, prompts, batch_size=16), base)[0]
        diff = p - zero
        se = diff.std(ddof=1) / np.sqrt(n)
        print(
            f"α {keep} damping {d}: zeroth {zero.mean():.2f} first {p.mean():.2f} "
            f"diff {diff.mean():+.2f} ± {se:.2f}",
            flush=True,
        )
    forecast.TokenForecast.apply = orig
remove_cat(pipe)
