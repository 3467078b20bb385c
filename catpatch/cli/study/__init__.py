"""`catpatch study`: image quality under pruning, CAT against naive selection at equal MACs.

On a trained pipeline shipped in catpatch (`--model toy` or `scenes`), a fixed set of
captions and seeds is generated unpatched and with every method, for 28 and 50 steps and keep
ratios 0.2 / 0.3 / 0.5:

- token policies at the same MACs: `cat` (CAT; the default policy until 0.2.0), `paper` (the
  reference's rules), each also with the first-order token forecast (`+forecast`,
  `token_order=1`), and the ablations `random`, `noise` (drift only), `stale` (round robin);
- whole-step peers: `step` (step-level reuse at CAT's MACs) and `step+forecast` (skipped
  steps forecast, `reuse_order=1`; the default policy since 0.3.0), also at α 0.05 / 0.1 to
  cover low MACs; `cat+reuse` (CAT combined with step reuse at MACs 0.4 / 0.5 / 0.6, zeroth
  and first order); diffusers' `taylorseer` (attention forecast) and `taylorseer-lite`
  (whole steps forecast) at cache intervals 2-4, MACs measured with torch's FLOP counter
  (`catpatch.peers.taylorseer`), and MagCache (`catpatch.peers.magcache`);
- warm-up t0 and the cluster count swept around the defaults (28 steps, α 0.3);
- with `catpatch study --macs B` (`planned_runs`), also `planned`: `CATConfig(macs=B)`, the
  planner's steps with forecasts on the others, at every step count (its row: α 1, t0 the
  plan's leading computed steps, setting the budget and forecast).

Fidelity to the unpatched output: PSNR and SSIM in pixel space (torchmetrics), the relative L2
error of the final latents; caption following: the toy detector's accuracy on the images
(colour and position of the shape both right, and all six attributes right). Writes
`study.csv`, `study.md` (a table), `study.png` (PSNR against MACs, one line per method) and
`study.json`, and `targets.md` (the comparisons at equal MACs), each naming the catpatch
version. Finished runs are kept in `rows.jsonl` (and the unpatched references in
`reference-*.pt`), so rerunning into the same folder resumes an interrupted study; use a new
folder after changing the model or the code.

Modules: `methods` (the methods and the configurations run), `rows` (`Row` and the resumable
record), `runs` (`run_study`: generating and scoring), `tables` (the CSV / JSON / Markdown
outputs and `targets.md`), `plot` (`study.png`).
"""

from .methods import (
    CATPATCH_METHODS,
    CLUSTER_SWEEP,
    COMBINED_METHODS,
    KEEP_RATIOS,
    LOW_STEP_KEEP_RATIOS,
    METHODS,
    PLANNED,
    QUICK_METHODS,
    REUSE_MACS,
    STEP_METHODS,
    STEPS,
    TAYLORSEER_INTERVALS,
    TOKEN_METHODS,
    WARMUP_SWEEP,
    Setting,
    configurations,
    planned_runs,
)
from .plot import frontier, plot
from .rows import Row
from .runs import check_model, fidelity, generate_images, run_study
from .tables import markdown_table, targets, write_outputs

_generate = generate_images  # its name before the split, for scripts written against it

__all__ = [
    "CATPATCH_METHODS",
    "CLUSTER_SWEEP",
    "COMBINED_METHODS",
    "KEEP_RATIOS",
    "LOW_STEP_KEEP_RATIOS",
    "METHODS",
    "PLANNED",
    "QUICK_METHODS",
    "REUSE_MACS",
    "STEPS",
    "STEP_METHODS",
    "TAYLORSEER_INTERVALS",
    "TOKEN_METHODS",
    "WARMUP_SWEEP",
    "Row",
    "Setting",
    "check_model",
    "configurations",
    "fidelity",
    "frontier",
    "generate_images",
    "markdown_table",
    "planned_runs",
    "plot",
    "run_study",
    "targets",
    "write_outputs",
]
