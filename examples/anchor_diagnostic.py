"""Why cluster anchors do not help here: at every anchor step of a budgeted run, how far the
anchors' computed outputs, the forecast, and the corrected forecast are from the model's own
output at the same input (relative L2 error; the anchors' own tokens, and all the others).

    python examples/anchor_diagnostic.py --choice score --anchors 1   # toy, 28 steps, MACs 0.4
    python examples/anchor_diagnostic.py --choice random --anchors 2

The run itself uses gain 0 (its trajectory is the uncorrected one); the correction at gain 1
is formed on the side from the same anchors and compared.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from catpatch import CATConfig, apply_cat, remove_cat
from catpatch import trained as shipped
from catpatch.caches import gather_tokens
from catpatch.correction import cluster_correction
from catpatch.patching import get_patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--macs", type=float, default=0.4)
    parser.add_argument("--anchors", type=int, default=1)
    parser.add_argument("--choice", default="score", choices=["score", "random"])
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    trained = shipped.get(args.model)
    pipe = trained.load_pipeline()
    config = CATConfig(
        macs=args.macs, anchors=args.anchors, anchor_choice=args.choice, anchor_gain=0.0
    )
    apply_cat(pipe, config)
    patch = get_patch(pipe)
    state, adapter = patch.state, patch.adapter
    seen, inputs = [], []
    anchored = state._anchored

    def spy(computed, step):
        schedule = state.schedule
        forecast = state.sample_tokens(state.steps.output(schedule.step, schedule.call))
        labels = schedule.rows_of(state.tokens.labels)
        corrected = cluster_correction(
            forecast, computed, step.index, step.image, labels, config.num_clusters, 1.0
        )
        index = step.index.clone()  # the step index is rewritten in place every step
        seen.append((schedule.step, computed.clone(), forecast.clone(), corrected, index))
        return anchored(computed, step)

    def record(module, call_args, kwargs):
        if state.schedule.mode.name == "PRUNED":
            inputs.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    state._anchored = spy
    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    trained.generate(pipe, trained.eval_prompts(args.images))
    hook.remove()
    remove_cat(pipe)
    print(f"{config!r}: relative error against the model's own output at the same input")
    for (step, computed, forecast, corrected, index), kwargs in zip(seen, inputs, strict=True):
        with torch.no_grad():
            truth = adapter.sample_tokens(pipe.transformer(**{**kwargs, "return_dict": False})[0])
        at = gather_tokens(truth, index)
        others = torch.ones(truth.shape[:2], dtype=torch.bool).scatter_(1, index, False)

        def err(x, y):
            return float((x - y).norm() / y.norm())

        print(
            f"step {step + 1:2d}: anchors {err(computed, at):.4f} forecast "
            f"{err(gather_tokens(forecast, index), at):.4f} | other tokens: forecast "
            f"{err(forecast[others], truth[others]):.4f} corrected "
            f"{err(corrected[others], truth[others]):.4f}"
        )


if __name__ == "__main__":
    main()
