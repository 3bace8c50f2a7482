"""Compare finished runs: a table and a plot of the metric against tunable parameters.

A run is a folder holding ``summary.json`` (written by ``utuning.engine.train``)::

    name, tuners, tunable_params, total_params, tunable_share, train_time_s,
    best_eval: {step, epoch, metrics: {...}}, final_eval: {...}

and, beside it, the resolved ``recipe.yaml`` (its tuner names give the method, unless a
``sweep.json`` written by ``utuning sweep`` names it; its data section gives the data set).

Runs whose resolved recipes are equal but for the seed (and name, output folder) form one
configuration: ``aggregate`` gives its mean, sample standard deviation and n. ``paper_tables``
lays configurations out as the papers print them: CIFAR-100; the five FGVC sets and their mean;
VTAB-1k's 19 tasks, the Natural / Specialized / Structured group means, the mean of the 19 tasks
and the mean of the three group means (both labelled); the GLUE tasks and their average; each
with the tunable parameters in millions (mean over the table's data sets). ``format_markdown``,
``format_csv`` and ``plot_tables`` (accuracy against parameters) write them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


def _recipe(run: Path) -> dict[str, Any]:
    path = run / "recipe.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return data if isinstance(data, dict) else {}


def _sweep_info(run: Path) -> dict[str, Any]:
    """``sweep.json``, written by ``utuning sweep`` into each run folder it launches (method, data, params)."""
    path = run / "sweep.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def dataset_id(recipe: Mapping[str, Any]) -> str:
    """``data.name``, with the ``task`` argument joined for multi-task loaders (``glue`` + cola: ``glue_cola``)."""
    data = recipe.get("data") or {}
    task = (data.get("args") or {}).get("task")
    return f"{data.get('name', '?')}_{task}" if task else str(data.get("name", "?"))


# Keys that do not change what a run measures: runs equal but for these differ only by seed.
SEED_ONLY = {("name",), ("description",), ("defaults",), ("output",), ("train", "seed"), ("train", "cache_dir"),
             ("train", "log_every"), ("imports",)}


def config_key(recipe: Mapping[str, Any]) -> str:
    """Hash of the resolved recipe without its seed, name and output folder."""
    def strip(node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(node, Mapping):
            return node
        return {k: strip(v, path + (k,)) for k, v in node.items() if path + (k,) not in SEED_ONLY}

    blob = json.dumps(strip(recipe, ()), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    recipe = _recipe(run)
    return {
        "run": str(run),
        "name": summary.get("name", run.name),
        "method": _sweep_info(run).get("method") or _method(run, summary),
        "dataset": dataset_id(recipe),
        "seed": (recipe.get("train") or {}).get("seed"),
        "config": config_key(recipe),
        "tunable": tunable,
        "total": total,
        "share": share,
        "metric": metric,
        "best": best.get(metric) if metric else None,
        "final": final.get(metric) if metric else None,
        "train_time_s": summary.get("train_time_s"),
        "status": summary.get("status", "finished"),  # finished | diverged | interrupted
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
    header = ["name", "method", "tunable", "%", "metric", "best", "final", "time (s)", "status"]
    body = [[str(r["name"]), r["method"], _num(r["tunable"], ","), _num(None if r["share"] is None else 100 * r["share"], ".3f"),
             str(r["metric"] or "-"), _num(r["best"], ".4f"), _num(r["final"], ".4f"), _num(r["train_time_s"], ".1f"),
             str(r.get("status", "finished")).upper() if r.get("status", "finished") != "finished" else "ok"]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    left = {0, 1, 4, 8}

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


# Seeds and paper-format tables ------------------------------------------------------------------
def aggregate(rows: Sequence[Mapping[str, Any]], *, value: str = "final") -> list[dict[str, Any]]:
    """One entry per configuration (runs equal but for the seed): mean, sample std and n of the
    ``value`` ("final" or "best") metric, and the mean tunable parameter count. Only finished runs
    count: an interrupted run has not reached its result, a diverged one has none."""
    if value not in ("final", "best"):
        raise ConfigError(f"value={value!r} must be 'final' (the last evaluation) or 'best' (the best one)")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("status", "finished") != "finished":
            continue
        groups.setdefault(r.get("config") or r["run"], []).append(r)
    out = []
    for key, runs in groups.items():
        values = [float(r[value]) for r in runs if r[value] is not None]
        mean = sum(values) / len(values) if values else None
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        tunable = [r["tunable"] for r in runs if r["tunable"] is not None]
        out.append({"config": key, "method": runs[0]["method"], "dataset": runs[0].get("dataset", "?"),
                    "metric": runs[0]["metric"], "mean": mean, "std": std, "n": len(values),
                    "seeds": sorted((r.get("seed") for r in runs), key=str), "runs": sorted(r["run"] for r in runs),
                    "tunable": sum(tunable) / len(tunable) if tunable else None})
    return sorted(out, key=lambda g: (g["dataset"], g["method"]))


@dataclass
class Benchmark:
    """A paper table: columns (dataset id, header), group means, and overall means ("tasks": the
    mean of every column, "groups": the mean of the group means). ``complete``: a mean needs every
    member (VTAB-1k, FGVC); otherwise it averages the columns the table has (GLUE)."""

    title: str
    columns: list[tuple[str, str]]
    groups: list[tuple[str, list[str]]] = field(default_factory=list)
    overall: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = True


def benchmarks() -> list[Benchmark]:
    """The tables of U-Tuning / Res-Tuning / VPT / LoRA, from the data modules' own task lists."""
    from utuning.data.fgvc import FGVC_SETS
    from utuning.data.vtab import DATASET_PREFIX, GROUPS, VTAB_TASKS

    vtab = [(DATASET_PREFIX + t, title) for t, (_, _, title) in VTAB_TASKS.items()]
    by_group = [(g, [DATASET_PREFIX + t for t, (_, group, _) in VTAB_TASKS.items() if group == g]) for g in GROUPS]
    glue = {"mnli": "MNLI", "sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "qnli": "QNLI", "qqp": "QQP",
            "rte": "RTE", "stsb": "STS-B"}
    return [
        Benchmark("CIFAR-100", [("cifar100", "CIFAR-100")]),
        Benchmark("FGVC", [(name, title) for name, (_, _, title) in FGVC_SETS.items()], overall=[("Mean", "tasks")]),
        Benchmark("VTAB-1k", vtab, groups=by_group,
                  overall=[("Mean (19 tasks)", "tasks"), ("Mean (group means)", "groups")]),
        Benchmark("GLUE", [(f"glue_{t}", title) for t, title in glue.items()], overall=[("Avg.", "tasks")],
                  complete=False),
    ]


def _mean(values: Sequence[float | None], complete: bool) -> float | None:
    present = [v for v in values if v is not None]
    if not present or (complete and len(present) < len(values)):
        return None
    return sum(present) / len(present)


def paper_tables(groups: Sequence[Mapping[str, Any]], *, scale: float = 100.0) -> list[dict[str, Any]]:
    """Tables ``{title, header, rows: [{method, params_m, cells: [(mean, std, n) | None]}], n}`` for the
    benchmarks the runs cover, then one table of the remaining data sets. Metrics are multiplied by
    ``scale`` (accuracy in %). Two configurations of one method on one data set are an error: a
    paper cell holds one (report a sweep's ``final/`` folder, not its search runs)."""
    cells: dict[tuple[str, str], Mapping[str, Any]] = {}
    for g in groups:
        other = cells.setdefault((g["method"], g["dataset"]), g)
        if other is not g:
            raise ConfigError(f"Method {g['method']!r} on {g['dataset']!r} has runs of two configurations (they "
                              f"differ in more than the seed): {other['runs'][0]!r} and {g['runs'][0]!r}. Report a "
                              "folder with one configuration per method and data set (a sweep's final/ folder)")
    known = {d for b in benchmarks() for d, _ in b.columns}
    rest = sorted({d for _, d in cells} - known)
    tables = []
    for bench in [*benchmarks(), Benchmark("Other data sets", [(d, d) for d in rest], complete=False)]:
        columns = [(d, h) for d, h in bench.columns if bench.complete or any(d == k[1] for k in cells)]
        methods = sorted({m for m, d in cells if d in dict(columns)})
        if not methods:
            continue
        header = ["Method", "Params (M)", *(h for _, h in columns)]
        header += [g for g, _ in bench.groups] + [label for label, _ in bench.overall]
        rows = []
        for method in methods:
            mine = [cells.get((method, d)) for d, _ in columns]
            values = {d: None if c is None or c["mean"] is None else scale * c["mean"] for (d, _), c in zip(columns, mine)}
            group_means = [_mean([values.get(d) for d in members], bench.complete) for _, members in bench.groups]
            overall = [_mean(list(values.values()) if kind == "tasks" else group_means, bench.complete)
                       for _, kind in bench.overall]
            params = [c["tunable"] for c in mine if c is not None and c["tunable"] is not None]
            cells_out = [None if c is None or c["mean"] is None else
                         (scale * c["mean"], None if c["std"] is None else scale * c["std"], c["n"]) for c in mine]
            cells_out += [None if v is None else (v, None, None) for v in group_means + overall]
            rows.append({"method": method, "params_m": sum(params) / len(params) / 1e6 if params else None,
                         "cells": cells_out})
        ns = {c[2] for r in rows for c in r["cells"] if c is not None and c[2] is not None}
        tables.append({"title": bench.title, "header": header, "rows": rows, "n": ns.pop() if len(ns) == 1 else None})
    return tables


def _cell(cell: tuple[float, float | None, int | None] | None, show_n: bool) -> str:
    if cell is None:
        return "-"
    mean, std, n = cell
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return text + (f" (n={n})" if show_n and n is not None else "")


def format_markdown(tables: Sequence[Mapping[str, Any]]) -> str:
    """Paper tables as Markdown: ``mean ± std`` over seeds (n stated under the table, or per cell when it varies)."""
    parts = []
    for t in tables:
        lines = [f"### {t['title']}", "", "| " + " | ".join(t["header"]) + " |",
                 "|" + "|".join([":---", *["---:"] * (len(t["header"]) - 1)]) + "|"]
        for r in t["rows"]:
            cells = [r["method"], _num(r["params_m"], ".2f"), *(_cell(c, t["n"] is None) for c in r["cells"])]
            lines.append("| " + " | ".join(cells) + " |")
        if t["n"]:
            lines += ["", f"Mean ± sample std over {t['n']} seed(s) per cell; parameters in millions (mean over tasks)."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def format_csv(tables: Sequence[Mapping[str, Any]]) -> str:
    """Paper tables as tidy CSV: table, method, params_m, column, mean, std, n (one line per cell)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "method", "params_m", "column", "mean", "std", "n"])
    for t in tables:
        for r in t["rows"]:
            for column, c in zip(t["header"][2:], r["cells"]):
                mean, std, n = c if c is not None else (None, None, None)
                writer.writerow([t["title"], r["method"], "" if r["params_m"] is None else f"{r['params_m']:.4f}",
                                 column, "" if mean is None else f"{mean:.4f}", "" if std is None else f"{std:.4f}",
                                 "" if n is None else n])
    return buffer.getvalue()


def plot_tables(tables: Sequence[Mapping[str, Any]], folder: str | Path) -> list[Path]:
    """Accuracy against tunable parameters per table (its last column: the overall mean), one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for t in tables:
        points = [(r["params_m"], r["cells"][-1][0], r["method"]) for r in t["rows"]
                  if r["params_m"] and r["cells"][-1] is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for x, y, method in points:
            ax.scatter([x], [y], s=36, label=method)
            ax.annotate(method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("tunable parameters (M, log scale)")
        ax.set_ylabel(f"{t['header'][-1]} (%)")
        ax.set_title(t["title"])
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        out = Path(folder) / f"{t['title'].lower().replace(' ', '_').replace('-', '')}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        plt.close(fig)
        written.append(out)
    return written


def tables_report(runs_dir: str | Path, *, value: str = "final", markdown: str | Path | None = None,
                  csv: str | Path | None = None, plots: str | Path | None = None) -> str:
    """``utuning report --tables``: the paper tables of the runs under ``runs_dir`` as Markdown,
    optionally also written to ``markdown`` / ``csv`` files and plotted into the ``plots`` folder."""
    tables = paper_tables(aggregate(collect(runs_dir), value=value))
    text = format_markdown(tables)
    for path, content in ((markdown, text), (csv, format_csv(tables) if csv else None)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
    if plots:
        plot_tables(tables, plots)
    return text
