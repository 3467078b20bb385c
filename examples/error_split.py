"""Where CAT's error comes from, on the toy model: CAT with a full-model oracle per pruned step.

    python examples/error_split.py [--images 64] [--model toy] [--steps 28] [--keep-ratio 0.3]
                                   [--out out/error-split.jsonl]

Generates the evaluation prompts unpatched and then with CAT (α 0.3, CFG, eager) under every
oracle variant of `catpatch.analysis.error_split` (same seeds): each removes some of CAT's
error sources, (a) stale outputs of the unselected tokens, (b) stale K/V the selected tokens
attend to, (c) the selection reading the estimated instead of the true drift. Per variant:
mean PSNR against unpatched with its standard error over images, the paired difference to
plain CAT, the relative error of the final latents, and the per-step relative error against
the oracle's true output, split over selected and unselected tokens. Writes the rows as JSON
lines to `--out` and a Markdown table next to it (`.md`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

import catpatch
from catpatch import CATConfig, toy
from catpatch.analysis.error_split import VARIANTS, error_split
from catpatch.cli.study import fidelity, generate_images


def _mean_se(x: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and standard error over images; None where not finite (identical images)."""
    if not np.all(np.isfinite(x)):
        return None, None
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(x.mean()), se


def _load(model: str):
    if model == "toy":
        return toy.load_pipeline()
    folder = Path(model).expanduser()
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"--model {model}: 'toy' or a folder written by python -m catpatch.toy")
    return toy.load_pipeline(path=folder)


def _number(x: float | None, digits: int, se: float | None = None) -> str:
    if x is None:
        return "∞"
    text = f"{x:.{digits}f}"
    return text if se is None or not math.isfinite(se) else f"{text} ± {se:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| variant | error sources left | PSNR dB | variant − cat dB | latent err | "
        "step err selected | step err unselected | step err total | policy input err |\n"
        f"|{'---|' * 9}\n"
    )
    lines = []
    for r in rows:
        psnr = _number(r["psnr"], 2, r["psnr_se"])
        if r["psnr"] is None:
            psnr += f" ({r['identical']}/{r['images']} identical)"
        lines.append(
            f"| {r['variant']} | {r['remaining']} | {psnr} | "
            f"{_number(r['psnr_minus_cat'], 2, r['psnr_minus_cat_se'])} | "
            f"{_number(r['latent_error'], 4, r['latent_error_se'])} | "
            f"{r['step_error_selected']:.4f} | {r['step_error_unselected']:.4f} | "
            f"{r['step_error_total']:.4f} | {r['policy_input_error']:.4f} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per variant (default 64)")
    parser.add_argument(
        "--model", default="toy", help="toy, or a folder of python -m catpatch.toy train"
    )
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    parser.add_argument("--keep-ratio", type=float, default=0.3, help="α (default 0.3)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch (default 16)")
    parser.add_argument("--out", default="out/error-split.jsonl", help="results (JSON lines)")
    args = parser.parse_args()
    pipe = _load(args.model)
    prompts = toy.eval_prompts(args.images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    start = time.perf_counter()
    ref_latents, reference = generate_images(pipe, prompts, args.steps, args.batch_size)
    ref_norm = ref_latents.flatten(1).norm(dim=1)
    print(f"unpatched: {time.perf_counter() - start:.0f} s", flush=True)
    # CAT with the dense estimate: source (c)
    config = CATConfig(selection="cat", keep_ratio=args.keep_ratio, lean=False)
    rows, cat_psnr = [], None
    for oracle in VARIANTS:
        start = time.perf_counter()
        with error_split(pipe, config, oracle) as log:
            latents, images = generate_images(pipe, prompts, args.steps, args.batch_size)
        psnr = fidelity(images, reference)[0]
        error = ((latents - ref_latents).flatten(1).norm(dim=1) / ref_norm).numpy()
        if cat_psnr is None:
            cat_psnr = psnr  # VARIANTS[0]: plain CAT
        (p, p_se), (d, d_se), (e, e_se) = (
            _mean_se(psnr), _mean_se(psnr - cat_psnr), _mean_se(error)
        )  # fmt: skip
        split = log.summary()
        row = {
            "variant": oracle.name, "remaining": oracle.remaining,
            "fresh_kv": oracle.fresh_kv, "fresh_outputs": oracle.fresh_outputs,
            "true_drift": oracle.true_drift, "model": args.model, "images": args.images,
            "steps": args.steps, "keep_ratio": args.keep_ratio,
            "psnr": p, "psnr_se": p_se, "psnr_min": _mean_se(psnr.min(keepdims=True))[0],
            "identical": int(np.isinf(psnr).sum()),
            "psnr_minus_cat": d, "psnr_minus_cat_se": d_se,
            "latent_error": e, "latent_error_se": e_se,
            "step_error_selected": split["selected"], "step_error_unselected": split["unselected"],
            "step_error_total": split["total"], "policy_input_error": split["drift_input"],
            "step_error_by_step": {str(k): v for k, v in log.by_step().items()},
            "seconds": time.perf_counter() - start,
        }  # fmt: skip
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps({**row, "catpatch_version": catpatch.__version__}) + "\n")
        print(
            f"{oracle.name} (left: {oracle.remaining}): PSNR {_number(p, 2, p_se)} dB, "
            f"latent err {_number(e, 4)}, step err {split['total']:.4f} "
            f"({row['seconds']:.0f} s)",
            flush=True,
        )
    table = markdown(rows)
    out.with_suffix(".md").write_text(
        f"{args.images} images, {args.steps} steps, α {args.keep_ratio:g}, model {args.model}."
        f"\n\n{table}"
    )
    print(table)


if __name__ == "__main__":
    main()
