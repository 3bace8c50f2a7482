"""Matplotlib (Agg) plots of the speed/memory ratios; one PNG per model, one for small vs base."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIDE = {"linear_probe", "ytuning", "bypass"}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def plot_model(record: dict, ratios: dict[str, dict], folder: Path) -> Path | None:
    """Train time and memory over full fine-tuning, and inference over the plain backbone."""
    train = [(m, r["train_time"], r["train_mem"]) for m, r in ratios.items()
             if _finite(r.get("train_time")) and not m.startswith("full")]
    infer = [(m, r["infer_time"]) for m, r in ratios.items() if _finite(r.get("infer_time")) and m != "plain_timm"]
    if not train and not infer:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.35 * max(len(train), len(infer), 4) + 1.5))
    y = range(len(train))
    a.barh([i - 0.2 for i in y], [t for _, t, _ in train], height=0.4, label="step time")
    a.barh([i + 0.2 for i in y], [m for _, _, m in train], height=0.4, label="peak step memory")
    a.set_yticks(list(y), [m for m, _, _ in train])
    a.axvline(0.75, color="k", ls="--", lw=0.8, label="0.75 (in-backbone time target)")
    a.axvline(0.40, color="r", ls=":", lw=0.8, label="0.40 (side time target)")
    a.axvline(1.0, color="grey", lw=0.5)
    a.invert_yaxis()
    a.set_xlabel("× full fine-tuning")
    a.legend(fontsize=7, loc="lower right")
    a.set_title("train step")
    b.barh(range(len(infer)), [t for _, t in infer], color="tab:green")
    b.set_yticks(range(len(infer)), [m for m, _ in infer])
    b.axvline(1.0, color="k", ls="--", lw=0.8)
    b.axvline(1.05, color="r", ls=":", lw=0.8)
    b.invert_yaxis()
    b.set_xlabel("× plain timm forward")
    b.set_title("inference")
    fig.suptitle(f"{record['model']} ({record['mode']} mode)")
    fig.tight_layout()
    tag = f"_{record['tag']}" if record.get("tag") else ""
    path = Path(folder) / f"{record['mode']}_{record['model']}{tag}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_scaling(by_model: dict[str, dict[str, dict]], folder: Path, key: str = "train_time") -> Path | None:
    """A train ratio (``train_time`` or ``train_mem``) per method for each model side by side (how
    ratios move with size); None when no method has it for every model."""
    models = list(by_model)
    methods = [m for m in by_model[models[0]] if not m.startswith("full")
               and all(_finite(by_model[x].get(m, {}).get(key)) for x in models)]
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(methods), 4) + 1.5))
    width = 0.8 / max(len(models), 1)
    for k, model in enumerate(models):
        ax.barh([i + k * width for i in range(len(methods))], [by_model[model][m][key] for m in methods],
                height=width, label=model)
    ax.set_yticks([i + width * (len(models) - 1) / 2 for i in range(len(methods))], methods)
    ax.axvline(0.75, color="k", ls="--", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"train step {'time' if key == 'train_time' else 'peak memory'} × full fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(folder) / f"scaling_{key}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_accuracy(study: str, points: dict[str, dict], folder: Path) -> Path | None:
    """Accuracy (mean ± std over seeds) against the tunable share of parameters (log scale)."""
    pts = [(m, d["share"] * 100, d["mean"], d["std"]) for m, d in points.items() if d["share"] > 0]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, share, mean, std in pts:
        marker = "s" if m == "full" else ("^" if m in SIDE else "o")
        ax.errorbar(share, mean, yerr=std, fmt=marker, capsize=3)
        ax.annotate(m, (share, mean), textcoords="offset points", xytext=(4, 3), fontsize=7)
    full = points.get("full")
    if full:
        ax.axhline(full["mean"], color="grey", lw=0.8, ls="--", label="full fine-tuning")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("tunable parameters (% of total, log scale)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(f"{study}: accuracy vs tunable parameters")
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"accuracy_{study}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
