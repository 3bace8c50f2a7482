"""Compare finished runs: a table and a plot of the metric against tunable parameters.

A run is a folder holding ``summary.json`` (written by ``utuning.engine.train``)::

    name, tuners, tunable_params, total_params, tunable_share, train_time_s,
    best_eval: {step, epoch, metrics: {...}}, final_eval: {...}

and, beside it, the resolved ``recipe.yaml`` (its tuner names give the method).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from utuning.errors import ConfigError


def _method(run: Path, summary: Mapping[str, Any]) -> str:
    """Tuner names as written in the recipe (compositions unexpanded); tuners at the head (the
    trainable classifier every method has) only if nothing else is tuned."""
    entries: list[Mapping[str, Any]] = []
    recipe = run / "recipe.yaml"
    if recipe.is_file():
        data = yaml.safe_load(recipe.read_text()) or {}
        entries = [t for t in data.get("tuners") or [] if isinstance(t, Mapping)]
    if not entries:
        entries = [t if isinstance(t, Mapping) else {"name": t} for t in summary.get("tuners") or []]
    names = list(dict.fromkeys(str(t.get("name")) for t in entries))
    core = list(dict.fromkeys(str(t.get("name")) for t in entries if t.get("at") != "head"))
    return "+".join(core or names) or "?"


def _primary(metrics: Mapping[str, Any]) -> str | None:
    """The first metric that is not the loss (the engine's order puts the dataset's main metric first)."""
    return next((k for k in metrics if k != "loss"), "loss" if "loss" in metrics else None)


def read_run(run: str | Path) -> dict[str, Any]:
    """One table row from a run folder's ``summary.json``."""
    run = Path(run)
    path = run / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"Cannot read run summary {str(path)!r}: {e}") from e
    final = summary.get("final_eval") or {}
    best = (summary.get("best_eval") or {}).get("metrics") or {}
    metric = _primary(best or final)
    tunable = summary.get("tunable_params")
    total = summary.get("total_params")
    share = summary.get("tunable_share")
    if share is None and tunable is not None and total:
        share = tunable / total
    return {
        "run": str(run),
        "name": summary.get("name", run.name),
        "method": _method(run, summary),
        "tunable": tunable,
        "total": total,
        "share": share,
        "metric": metric,
        "best": best.get(metric) if metric else None,
        "final": final.get(metric) if metric else None,
        "train_time_s": summary.get("train_time_s"),
    }


def collect(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of every finished run (a ``summary.json``) under ``runs_dir``, sorted by tunable parameters."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ConfigError(f"Runs directory {str(root)!r} does not exist")
    runs = sorted({p.parent for p in root.rglob("summary.json")})
    if not runs:
        raise ConfigError(f"No finished runs (summary.json) under {str(root)!r}")
    rows = [read_run(r) for r in runs]
    return sorted(rows, key=lambda r: (r["tunable"] is None, r["tunable"] or 0, r["name"]))


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ["name", "method", "tunable", "%", "metric", "best", "final", "time (s)"]
    body = [[str(r["name"]), r["method"], _num(r["tunable"], ","), _num(None if r["share"] is None else 100 * r["share"], ".3f"),
             str(r["metric"] or "-"), _num(r["best"], ".4f"), _num(r["final"], ".4f"), _num(r["train_time_s"], ".1f")]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    left = {0, 1, 4}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def plot(rows: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Best metric against tunable parameters (log x), one labelled point per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["tunable"] and r["best"] is not None]
    if not points:
        raise ConfigError("No run has both a tunable parameter count and a metric to plot")
    metrics = sorted({str(r["metric"]) for r in points})
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in sorted({r["method"] for r in points}):
        mine = [r for r in points if r["method"] == method]
        ax.scatter([r["tunable"] for r in mine], [r["best"] for r in mine], label=method, s=36)
        for r in mine:
            ax.annotate(str(r["name"]), (r["tunable"], r["best"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    low, high = min(r["tunable"] for r in points), max(r["tunable"] for r in points)
    ax.set_xlim(10 ** (math.log10(low) - 0.3), 10 ** (math.log10(high) + 0.3))
    ax.set_xlabel("tunable parameters (log scale)")
    ax.set_ylabel(" / ".join(metrics) + " (best eval)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
