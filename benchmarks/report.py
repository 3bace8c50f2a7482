"""Build ``README.md`` (tables) and ``plots/*.png`` from the JSON results of ``benchmarks.run``.

Ratios are always taken between rows of the same results file, i.e. measured side by side in
one run on one machine: train-step time and peak memory over full fine-tuning of the plain timm
/ transformers model, inference time over the plain timm model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from benchmarks.plots import plot_model, plot_scaling

SIDE = {"linear_probe", "ytuning", "bypass", "bypass_stored"}
PEFT_PAIRS = [("lora", "peft_lora", "LoRA r=8 on qkv"), ("ia3", "peft_ia3", "IA3 on qkv outputs and fc2 inputs"),
              ("lora_merged", "peft_lora_merged", "LoRA merged (inference)")]
TEXT_PAIRS = [("prefix", "peft_prefix", "prefix tuning, 10 tokens"), ("prompt", "peft_prompt", "prompt tuning, 10 tokens")]
TARGET_IN = 0.75
TARGET_SIDE_TIME, TARGET_SIDE_MEM = 0.40, 0.35
TARGET_ADAPTER_INFER, TARGET_MERGED = 1.05, 1.00
MERGED_SLACK = 0.02  # timing noise allowed on "merged LoRA = 1.00"
HERE = Path(__file__).resolve().parent


def load(out: Path, mode: str) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((out / "results").glob(f"speed_{mode}_*.json"))]
    return sorted(records, key=lambda r: (r["model"].startswith("bert"), "base" in r["model"], r["model"]))


def _ok(rows: list[dict], method: str, mode: str, tasks: int | None = None) -> dict | None:
    for r in rows:
        if r["method"] == method and r["mode"] == mode and r["status"] == "ok" and (tasks is None or r["tasks"] == tasks):
            return r
    return None


#: A timed process that had less than this share of its cores' time competed with other work on them.
MIN_CPU_SHARE = 0.9


def oversubscribed(record: dict) -> bool:
    """Whether the machine ran more than one spare job's worth of other work during the run (1-minute
    load above cores + 1) during a full-mode run: its time ratios are then not reported, only memory (which load does not change)."""
    if record.get("mode") != "full":  # quick mode (CI) only checks that the harness works
        return False
    # A row that measured its own share of its cores (CPU ÷ wall × threads: runs pinned to a dedicated core,
    # where the load average also counts the other cores' work) is judged by that share alone.
    if any(r.get("cpu_share") is not None and r["cpu_share"] < MIN_CPU_SHARE for r in record["rows"]):
        return True
    loads = [x for r in record["rows"] if r.get("cpu_share") is None for x in r.get("load", [])]
    cores = record["rows"][0].get("cores") or os.cpu_count() or 1
    return bool(loads) and max(loads) > cores + 1


def _same_threads(row: dict, ref: dict) -> bool:
    """Whether two rows ran with the same number of torch threads (a time ratio across thread counts
    measures the threads, not the method)."""
    return row.get("threads") == ref.get("threads")


def ratios(record: dict) -> dict[str, dict]:
    """method -> {train_time, train_mem, infer_time} relative to the plain model, as numbers (times
    are NaN when the run was oversubscribed)."""
    rows = record["rows"]
    timed = not oversubscribed(record)
    ref_train = _ok(rows, "full_timm", "train") or _ok(rows, "full_hf", "train")
    ref_infer = _ok(rows, "plain_timm", "infer")
    out: dict[str, dict] = {}
    for r in rows:
        if r["status"] != "ok" or r["tasks"] != 1:
            continue
        d = out.setdefault(r["method"], {})
        if r["mode"] == "train" and ref_train:
            d["train_time"] = r["median_s"] / ref_train["median_s"] if timed and _same_threads(r, ref_train) else math.nan
            d["train_mem"] = r["peak_mib"] / ref_train["peak_mib"] if ref_train["peak_mib"] else math.nan
            d["tunable"] = r["tunable"] / r["total"]
        if r["mode"] == "infer" and ref_infer:
            d["infer_time"] = r["median_s"] / ref_infer["median_s"] if timed and _same_threads(r, ref_infer) else math.nan
        d.setdefault("tunable", r["tunable"] / r["total"] if r.get("total") else math.nan)
    return out


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "**missed**")


def _target(method: str, r: dict) -> tuple[str, bool | None]:
    if method in ("full", "full_timm", "full_hf"):
        return "", None
    if method == "floor_timm":
        return "reference: no weight gradients", None
    if math.isnan(r.get("train_time", 0.0)):
        return "time withheld (oversubscribed)", None
    if method in SIDE:
        ok = r.get("train_time", math.inf) <= TARGET_SIDE_TIME and r.get("train_mem", math.inf) <= TARGET_SIDE_MEM
        return f"time ≤ {TARGET_SIDE_TIME}, mem ≤ {TARGET_SIDE_MEM}", ok
    if method.startswith("peft_"):
        return "", None
    return f"time ≤ {TARGET_IN}", r.get("train_time", math.inf) <= TARGET_IN


def _name(record: dict, r: dict) -> str:
    """A row's method, marked when a partial run (``--methods``) measured it after the record's run."""
    later = r.get("started") and r["started"] != record["started"]
    return f"{r['method']} (later run, {r['started']})" if later else r["method"]


def _other_run(record: dict, r: dict, *refs: str) -> bool:
    """Whether row ``r`` and its reference row were measured in different runs (a partial run merged
    into the record): their ratio then includes the machine's drift between the runs."""
    ref = next(filter(None, (_ok(record["rows"], m, r["mode"]) for m in refs)), None)
    return ref is not None and r.get("started", record["started"]) != ref.get("started", record["started"])


def train_table(record: dict) -> list[str]:
    rows, rat = record["rows"], ratios(record)
    lines = ["| method | tunable | step (s) | × full FT time | peak step memory (MiB) | × full FT memory | target | |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r["mode"] != "train" or r["tasks"] != 1:
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | | | | | | {r['status']}: {_reason(r)} | |")
            continue
        q = rat[r["method"]]
        target, ok = _target(r["method"], q)
        ref = _ok(rows, "full_timm", "train") or _ok(rows, "full_hf", "train")
        if ref and not _same_threads(r, ref):
            target, ok = (f"{r.get('threads')} torch thread(s) against the reference's {ref.get('threads')}: no time "
                          "ratio (memory is thread-independent; time in the paired sections)"), None
        elif ok is not None and _other_run(record, r, "full_timm", "full_hf"):
            target, ok = f"{target}; reference from another run: no verdict (see the paired timings)", None
        lines.append(f"| {_name(record, r)} | {_f(q['tunable'] * 100)}% | {r['median_s']:.3f} | {_f(q['train_time'])} | "
                     f"{r['peak_mib']:.0f} | {_f(q['train_mem'])} | {target} | {_mark(ok)} |")
    return lines


def infer_table(record: dict) -> list[str]:
    rows, rat = record["rows"], ratios(record)
    lines = ["| method | forward (s) | × plain timm | target | |", "|---|---:|---:|---|---|"]
    for r in rows:
        if r["mode"] != "infer" or r["tasks"] != 1:
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | | | {r['status']}: {_reason(r)} | |")
            continue
        x = rat[r["method"]]["infer_time"]
        target, ok = "", None
        if math.isnan(x):
            target = "time withheld (oversubscribed)"
        elif r["method"] in ("adapter", "parallel_adapter"):
            target, ok = f"≤ {TARGET_ADAPTER_INFER}", x <= TARGET_ADAPTER_INFER
        elif r["method"] == "peft_lora_merged":
            target = "control: PEFT's merge_and_unload returns the plain timm model"
        elif r["method"].endswith("merged"):
            target, ok = f"{TARGET_MERGED:.2f} (±{MERGED_SLACK})", x <= TARGET_MERGED + MERGED_SLACK
        if ok is not None and _other_run(record, r, "plain_timm"):
            target, ok = f"{target}; reference from another run: no verdict (see the paired timings)", None
        lines.append(f"| {_name(record, r)} | {r['median_s']:.3f} | {_f(x)} | {target} | {_mark(ok)} |")
    return lines


def multi_table(record: dict) -> list[str]:
    rows = record["rows"]
    lines = ["| mode | T | one pass, T side tuners (s / MiB) | T separate models (s / MiB) | time ratio | memory ratio |",
             "|---|---:|---|---|---:|---:|"]
    found = False
    for mode in ("train", "infer"):
        for side in ("bypass", "ytuning"):
            a, b = _ok(rows, f"multi_{side}", mode), _ok(rows, f"separate_{side}", mode)
            if a and b:
                found = True
                lines.append(f"| {mode} ({side}) | {a['tasks']} | {a['median_s']:.3f} / {a['peak_mib']:.0f} | "
                             f"{b['median_s']:.3f} / {b['peak_mib']:.0f} | {a['median_s'] / b['median_s']:.2f} | "
                             f"{_f(a['peak_mib'] / b['peak_mib'] if b['peak_mib'] else math.nan)} |")
    return lines if found else []


def peft_table(record: dict, pairs) -> list[str]:
    rows, timed = record["rows"], not oversubscribed(record)
    lines = ["| method | mode | ours (s / MiB) | PEFT (s / MiB) | ours ÷ PEFT time | ours ÷ PEFT memory | ours ≤ PEFT |",
             "|---|---|---|---|---:|---:|---|"]
    for ours, peft, label in pairs:
        for mode in ("train", "infer"):
            a, b = _ok(rows, ours, mode), _ok(rows, peft, mode)
            pending = [r for r in rows if r["method"] == ours and r["mode"] == mode and r["status"] == "pending"]
            if pending and b:
                lines.append(f"| {label} | {mode} | pending: {_reason(pending[0])} | {b['median_s']:.3f} / "
                             f"{b['peak_mib']:.0f} | | | |")
            skipped = [r for r in rows if r["method"] == peft and r["mode"] == mode and r["status"] == "skipped"]
            if skipped and a:
                lines.append(f"| {label} | {mode} | {a['median_s']:.3f} / {a['peak_mib']:.0f} | skipped: "
                             f"{_reason(skipped[0])} | | | |")
            if not (a and b):
                continue
            same = timed and _same_threads(a, b)  # a time ratio across thread counts measures the threads
            t = a["median_s"] / b["median_s"] if same else math.nan
            m = a["peak_mib"] / b["peak_mib"] if b["peak_mib"] else math.nan
            ok = (t <= 1.0 if same else True) and not m > 1.0
            lines.append(f"| {label} | {mode} | {a['median_s']:.3f} / {a['peak_mib']:.0f} | {b['median_s']:.3f} / "
                         f"{b['peak_mib']:.0f} | {_f(t)} | {_f(m)} | {_mark(ok)}{'' if same else ' (memory only)'} |")
    return lines


def _load(record: dict) -> str:
    loads = [x for r in record["rows"] for x in r.get("load", [])]
    if not loads:
        return ""
    cores = record["rows"][0].get("cores") or os.cpu_count() or 1
    return (f"; 1-minute load average {min(loads):.1f}–{max(loads):.1f} on {cores} cores"
            + (" (**the machine was oversubscribed: time ratios are withheld, memory is reported**)"
               if oversubscribed(record) else
               " (**the machine was shared: timings are noisy**)" if max(loads) > cores + 0.5 else ""))


def _steps(record: dict) -> str:
    """How many steps each row's median is taken over."""
    def count(mode: str) -> int | None:
        return next((r["iters"] for r in record["rows"] if r["mode"] == mode), None)

    r0, train, infer = record["rows"][0], count("train"), count("infer")
    rounds = int(record.get("rounds") or 1)
    text = f"{r0['warmup']} warm-up + median of {train} timed train steps"
    if infer is not None:
        text += f" / {infer} timed forwards"
    if rounds > 1:
        text += (f", each in {rounds} rounds (a fresh process per row and round; job order reversed in every "
                 f"other round; steps pooled, memory the median of the rounds)")
    return text


def _reason(r: dict) -> str:
    reason = r.get("reason", "")
    return (" ".join(reason) if isinstance(reason, list) else str(reason)).replace("|", "/")[:160]


def _shape(record: dict) -> str:
    r = record["rows"][0]
    if r["family"] == "vit":
        depth = f", depth {r['depth']}" if r.get("depth") else ""
        return f"{r['model']} (random weights{depth}), {r['img']}×{r['img']} images, batch {r['batch']}"
    size = f", hidden {r['hidden']}" if r.get("hidden") else ""
    depth = f", {r['depth']} layers" if r.get("depth") else ""
    return f"BertForSequenceClassification of BERT-base shape{size}{depth} (random weights), seq {r['seq']}, batch {r['batch']}"


def write_page(out: Path, mode: str) -> Path:
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    records = load(out, mode)
    lines = [f"# utuning benchmarks ({mode} mode)", "",
             "Regenerate with `python -m benchmarks.run --full` (this page) or `python -m benchmarks.run --quick` "
             "(the CI check: small shapes, written to `runs/benchmarks-quick/`). Add `--report-only` to rebuild the "
             "page from `results/*.json` without measuring.", ""]
    lines += (HERE / "method.md").read_text().splitlines() + [""]
    if mode == "quick":
        lines += ["> **Quick mode**: shapes are shrunk so that the check runs in CI (ViT-S with 4 blocks on 64×64 "
                  "images at batch 4; a 2-layer, hidden-128 BERT at seq 32, batch 4). These numbers only show that "
                  "the harness works; they say little about the ratios at real shapes.", ""]
    for record in records:
        r0 = record["rows"][0]
        lines += [f"## {record['model']}{' (' + record['tag'] + ')' if record.get('tag') else ''}", "",
                  f"{_shape(record)}; fp32; {r0.get('threads')} torch threads on {r0.get('device', 'cpu')}; "
                  f"{_steps(record)}; run started {record['started']}, took {record['wall_s'] / 60:.1f} min"
                  f"{_load(record)}.", ""]
        sections = [("Train step over full fine-tuning", train_table(record))]
        if r0["family"] == "vit":
            sections += [("Inference over the plain backbone", infer_table(record)),
                         ("T tasks: one backbone pass with T side tuners vs T separate models", multi_table(record)),
                         ("Ours vs HF PEFT on the same timm model", peft_table(record, PEFT_PAIRS))]
        else:
            sections += [("Ours vs HF PEFT on the same BERT", peft_table(record, TEXT_PAIRS))]
        for i, (title, table) in enumerate(sections):
            if len(table) > 2:  # a header and its rule only: nothing of this kind was measured
                lines += [f"### {title}", ""] + table + [""]
            if i == 0 and r0["family"] == "vit":
                png = plot_model(record, ratios(record), out / "plots")
                if png:
                    lines += [f"![{record['model']}](plots/{png.name})", ""]
    vits = [r for r in records if r["rows"][0]["family"] == "vit" and not r.get("tag")]
    if len(vits) > 1:
        lines += ["## From small to base", "", _scaling_table(vits), ""]
        for key in ("train_time", "train_mem"):
            png = plot_scaling({r["model"]: ratios(r) for r in vits}, out / "plots", key)
            if png:
                lines += [f"![scaling {key}](plots/{png.name})", ""]
    from benchmarks.families import section as families_section  # lazy: families reads this module

    lines += families_section(out, mode)
    from benchmarks.llm import section as llm_section

    lines += llm_section(out, mode)
    for extra in ("paired", "side_regime", "peft_methods", "cache", "accuracy"):
        lines += _extra_section(out, mode, extra)
    notes = HERE / f"notes_{mode}.md"
    if notes.exists():
        lines += notes.read_text().splitlines() + [""]
    page = out / "README.md"
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page


def _scaling_table(vits: list[dict]) -> str:
    rats = {r["model"]: ratios(r) for r in vits}
    models = list(rats)
    head = "| method | " + " | ".join(f"{m} train time | {m} memory" for m in models) + " |"
    rows = [head, "|---|" + "---:|---:|" * len(models)]
    methods = [m for m in rats[models[0]] if all("train_time" in rats[x].get(m, {}) for x in models)]
    for method in methods:
        cells = " | ".join(f"{_f(rats[m][method]['train_time'])} | {_f(rats[m][method]['train_mem'])}" for m in models)
        rows.append(f"| {method} | {cells} |")
    return "\n".join(rows)


def _extra_section(out: Path, mode: str, kind: str) -> list[str]:
    """Sections written by other drivers as Markdown next to their JSON (cache epochs, accuracy)."""
    path = out / "results" / f"{kind}_{mode}.md"
    if path.exists():
        return path.read_text().splitlines() + [""]
    fallback = HERE / f"{kind}_pending.md"
    return (fallback.read_text().splitlines() + [""]) if fallback.exists() else []
