"""Check: step reuse with forecast and a 3-step warm-up (as TaylorSeer's) at low MACs, 64 images,
28 steps, against the study's unpatched reference (run `catpatch study --out out/study-t16` first).
"""

import json

import torch

from catpatch import CATConfig, apply_cat, cat_stats, remove_cat, toy
from catpatch.cli.study import fidelity

pipe = toy.load_pipeline()
prompts = toy.eval_prompts(64)
ref = torch.load("out/study-t16/reference-28-64.pt")["images"].numpy()
for keep in (0.05, 0.1, 0.2):
    config = CATConfig(keep_ratio=keep, warmup_steps=3, selection="step", reuse_order=1)
    apply_cat(pipe, config)
    imgs = toy.generate(pipe, prompts, batch_size=16)
    m = cat_stats(pipe).macs_ratio
    p = fidelity(imgs, ref)[0]
    record = {"keep_ratio": keep, "warmup_steps": 3, "macs": m, "psnr": float(p.mean())}
    print(json.dumps(record), flush=True)
remove_cat(pipe)
