"""Benchmark rows for the vision families beyond the timm ViT (issue 12): Swin-T, EVA-02-T, a BEiT and
ConvNeXt-Atto, each wrapped by its backbone adapter (``backbones/swin.py``, ``eva.py``, ``beit.py``,
``convnext.py``).

Per family, with random weights (nothing downloaded):

* train: Dual-U-Tuner (U-Tuning, arXiv 2303.00690: a parallel adapter beside every attention and
  every FFN operation) and LoRA (Hu et al., arXiv 2106.09685: rank 8 on the attention ``qkv``; on
  ConvNeXt, which has no attention, on the pointwise ``mlp.fc1`` / ``mlp.fc2`` layers), each with a
  linear head, against full fine-tuning of the plain timm model (every parameter trained);
* inference: the wrapped model with no tuners against the plain timm model (target ≤ 1.02).

Memory is the deterministic tensor-byte peak of one step, one child process per configuration
(``benchmarks.speed``). Time is taken twice: per process (withheld on the page when the machine was
oversubscribed, as for the ViT rows) and in the paired A B B A mode in one process
(``benchmarks.paired``), which the page reports with the 95% confidence interval of its median
(``benchmarks.paired.interval``) and the load average.

Jobs carry ``"family": "arch"`` and a key of ``FAMILIES`` as ``"model"``; ``benchmarks.methods.build``
dispatches them here. Run with ``python -m benchmarks.run --full --families`` (all four) or
``--families convnext_atto``; results go to ``results/families_<mode>_<key>.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from benchmarks.methods import Built, _count, _head
from benchmarks.report import MIN_CPU_SHARE  # a paired run below it competed with other work: no verdict

#: key -> timm model name, extra ``create_model`` arguments, LoRA sites and the Dual-U-Tuner's specs.
#: A Dual-U-Tuner is a parallel tuner on MHA and on FFN; a ConvNeXt block has neither, so its
#: equivalent is one parallel adapter beside the whole residual branch (dwconv -> norm -> MLP).
FAMILIES: dict[str, dict] = {
    "swin_tiny_patch4_window7_224": {"label": "Swin-T", "timm": "swin_tiny_patch4_window7_224", "kwargs": {},
                                     "lora": ["blocks.*.attn.qkv"], "dual": [("dual_u_tuner", "blocks.*")]},
    "eva02_tiny_patch14_224": {"label": "EVA-02-T", "timm": "eva02_tiny_patch14_224", "kwargs": {},
                               "lora": ["blocks.*.attn.qkv"], "dual": [("dual_u_tuner", "blocks.*")]},
    # BEiT-B (86 M parameters) takes ~4x a ViT-S step: the same Beit class at ViT-S width (384, 6 heads).
    "beit_small": {"label": "BEiT (ViT-S shape)", "timm": "beit_base_patch16_224",
                   "kwargs": {"embed_dim": 384, "num_heads": 6}, "lora": ["blocks.*.attn.qkv"],
                   "dual": [("dual_u_tuner", "blocks.*")]},
    "convnext_atto": {"label": "ConvNeXt-Atto", "timm": "convnext_atto", "kwargs": {}, "img_arg": False,
                      "lora": ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"], "dual": [("p_adapter", "blocks.*")]},
}
TRAIN = ["full_timm", "dual_u_tuner", "lora"]
INFER = ["plain_timm", "plain"]
#: Paired (A, B, mode): B's time over A's, stepped A B B A in one process.
PAIRS = [("full_timm", "dual_u_tuner", "train"), ("full_timm", "lora", "train"), ("plain_timm", "plain", "infer")]
#: A forward is a fraction of a train step: the inference pair repeats this many times more often, so
#: that a ratio near 1.00 can be read at all (as ``benchmarks.run.INFER_ITERS_FACTOR``).
INFER_REPEATS_FACTOR = 4
#: Shapes: 2 CPU cores shared with other work; 112x112 images (Swin-T keeps window 7: grids 28/14/7/4).
SHAPES = {"quick": {"img": 64, "batch": 2, "warmup": 1, "iters": 1, "repeats": 1},
          "full": {"img": 112, "batch": 4, "warmup": 1, "iters": 2, "repeats": 3}}
TARGET_INFER = 1.02


def timm_model(job: dict) -> nn.Module:
    """The plain timm model of a family job, random weights, ``job['classes']`` outputs."""
    import timm

    fam = FAMILIES[job["model"]]
    kwargs = {"num_classes": job["classes"], **fam["kwargs"]}
    if fam.get("img_arg", True):
        kwargs["img_size"] = job["img"]
    return timm.create_model(fam["timm"], pretrained=False, **kwargs)


def _specs(job: dict) -> list:
    fam, method = FAMILIES[job["model"]], job["method"]
    if method == "plain":
        return []
    if method == "dual_u_tuner":
        return [*fam["dual"], _head(job)]
    fused = {"fused": True} if all(s.endswith(".qkv") for s in fam["lora"]) else {}
    return [("lora", fam["lora"], {"rank": 8, "alpha": 8, **fused}), _head(job)]


def _ours(job: dict) -> Built:
    import utuning

    model = utuning.tune(utuning.wrap(timm_model(job)), _specs(job))
    return Built(model, trainable=model.trainable_parameters(), total=_count(model))


def _plain(job: dict) -> Built:
    model = timm_model(job)
    return Built(model, trainable=list(model.parameters()), total=_count(model))


ARCH_METHODS: dict[str, Callable[[dict], Built]] = {"full_timm": _plain, "plain_timm": _plain,
                                                    "plain": _ours, "dual_u_tuner": _ours, "lora": _ours}


def jobs_for(mode: str, key: str, *, threads: int, device: str, overrides: dict) -> list[dict]:
    shape = {**SHAPES[mode], **{k: v for k, v in overrides.items() if v is not None}}
    base = {"family": "arch", "model": key, "classes": 10, "threads": threads, "device": device, "tasks": 1,
            "img": shape["img"], "batch": shape["batch"], "warmup": shape["warmup"], "iters": shape["iters"]}
    return [dict(base, mode="train", method=m) for m in TRAIN] + [dict(base, mode="infer", method=m) for m in INFER]


def _paired(jobs: list[dict], kind: str, repeats: int) -> dict:
    """The ``kind`` ("train" / "infer") pairs of one family in one child process, with the load average
    before and after and each pair's repetitions."""
    from benchmarks.speed import run_child

    job = {k: v for k, v in jobs[0].items() if k not in ("mode", "method")}
    job.update(pairs=[p for p in PAIRS if p[2] == kind], repeats=repeats)
    load = [os.getloadavg()[0]]
    result = run_child("benchmarks.paired", job, timeout=3600)
    result["load"] = [*load, os.getloadavg()[0]]
    for p in result.get("pairs", []):
        p.update(repeats=repeats, load=result["load"], cpu_share=result.get("cpu_share"),
                 threads=result.get("threads"), affinity=result.get("affinity"))
    print(f"{job['model']} paired {kind}: {result.get('status')}")
    return result


def run_families(mode: str, out: Path, keys: list[str], *, threads: int, device: str, overrides: dict,
                 rounds: int = 1, methods: list[str] | None = None) -> list[Path]:
    """Measure every family in ``keys`` (speed rows, then the paired timings) and write
    ``results/families_<mode>_<key>.json`` for each; the written paths. ``methods`` (as ``--methods``)
    measures only those rows (and ``paired_train`` / ``paired_infer`` / ``paired``: those pairs) and
    keeps the stored others."""
    import json

    from benchmarks.run import measure_rounds, merge
    from utuning.errors import UnknownNameError, closest

    for key in keys:
        if key not in FAMILIES:
            raise UnknownNameError(f"Unknown benchmark family {key!r}. Did you mean {closest(key, FAMILIES)}? "
                                   f"Known: {sorted(FAMILIES)}")
    only = set(methods or [])
    repeats = overrides.get("repeats") or SHAPES[mode]["repeats"]
    paths = []
    for key in keys:
        path = out / "results" / f"families_{mode}_{key}.json"
        stored = json.loads(path.read_text()) if only and path.exists() else None
        jobs = jobs_for(mode, key, threads=threads, device=device, overrides=overrides)
        start = time.time()
        rows = measure_rounds([j for j in jobs if not only or j["method"] in only], rounds)
        old = (stored or {}).get("paired", {}).get("result", {}).get("pairs") or []
        results = {}
        for kind, factor in (("train", 1), ("infer", INFER_REPEATS_FACTOR)):
            if not only or {"paired", f"paired_{kind}"} & only:
                results[kind] = _paired(jobs, kind, repeats * factor)
        pairs = [p for kind in ("train", "infer") for p in (results[kind].get("pairs", []) if kind in results else
                                                             [q for q in old if q["mode"] == kind])]
        bad = [r for r in results.values() if r.get("status") != "ok"]
        paired = bad[0] if bad else {"status": "ok", "pairs": pairs,
                                     "load": [x for p in pairs for x in p.get("load", [])]}
        record = {"mode": mode, "model": key, "tag": "", "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(start)),
                  "wall_s": time.time() - start, "rounds": rounds, "rows": rows,
                  "paired": {"job": {"repeats": repeats, "infer_repeats": repeats * INFER_REPEATS_FACTOR}, "result": paired,
                             "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(start))}}
        if stored:
            record = {**(merge(stored, record) if rows else stored), "paired": record["paired"]}
        path.write_text(json.dumps(record, indent=1))
        paths.append(path)
    return paths


# The page -------------------------------------------------------------------------------------
def _pair(record: dict, method: str) -> dict | None:
    result = record.get("paired", {}).get("result", {})
    return next((p for p in result.get("pairs", []) if p["method"] == method), None) if result.get("status") == "ok" else None


def _paired_cell(p: dict | None) -> str:
    from benchmarks.paired import cell

    return cell(p, digits=2)


def _verdict(p: dict | None, busy: bool = False) -> str:
    """``benchmarks.paired.time_verdict`` against 1.02 (the median's 95% confidence interval, from the
    kept ratios); none when the machine was oversubscribed (1-minute load above cores + 1) while the pair ran."""
    from benchmarks.paired import time_verdict

    if p is None:
        return ""
    return "no verdict (oversubscribed)" if busy else time_verdict(p, TARGET_INFER)


def _loads(record: dict) -> list[float]:
    rows = [x for r in record["rows"] for x in r.get("load", [])]
    return rows + list(record.get("paired", {}).get("result", {}).get("load", []))




def _busy(record: dict, pair: dict | None) -> bool:
    """Whether ``pair`` competed with other work: its process had less than ``MIN_CPU_SHARE`` of its
    cores (measured in the child, valid when other work was pinned elsewhere), or, for runs that did not
    measure it, the load average while it (else the record's paired run) ran exceeded cores + 1."""
    if (pair or {}).get("cpu_share") is not None:
        return pair["cpu_share"] < MIN_CPU_SHARE
    loads = (pair or {}).get("load") or record.get("paired", {}).get("result", {}).get("load") or []
    cores = record["rows"][0].get("cores") or os.cpu_count() or 1
    return bool(loads) and max(loads) > cores + 1


def summary_table(records: list[dict]) -> list[str]:
    """One row per family: the paired time ratios, the per-process memory ratios, the untuned overhead."""
    from benchmarks.report import _f, ratios

    lines = ["| family (parameters) | Dual-U-Tuner tunable | Dual × full FT time (paired, 95% CI) | Dual × full FT memory "
             "| LoRA tunable | LoRA × full FT time (paired, 95% CI) | LoRA × full FT memory "
             "| untuned wrapped ÷ plain timm, inference (paired, 95% CI) | ≤ 1.02 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rec in records:
        rat, fam = ratios(rec), FAMILIES.get(rec["model"], {"label": rec["model"]})
        total = next((r["total"] for r in rec["rows"] if r["method"] == "full_timm" and r["status"] == "ok"), None)
        dual, lora = rat.get("dual_u_tuner", {}), rat.get("lora", {})
        plain = _pair(rec, "plain")
        lines.append(f"| {fam['label']} ({_f(total / 1e6 if total else None, 1)} M) | {_f(dual.get('tunable', 0) * 100)}% | "
                     f"{_paired_cell(_pair(rec, 'dual_u_tuner'))} | {_f(dual.get('train_mem'))} | "
                     f"{_f(lora.get('tunable', 0) * 100)}% | {_paired_cell(_pair(rec, 'lora'))} | {_f(lora.get('train_mem'))} | "
                     f"{_paired_cell(plain)} | {_verdict(plain, _busy(rec, plain))} |")
    return lines


def detail_table(record: dict) -> list[str]:
    """The per-process rows of one family: step time, peak step memory and their ratios."""
    from benchmarks.report import _f, _reason, ratios

    rat = ratios(record)
    lines = ["| mode | method | tunable | step (s) | × reference time (per process) | peak step memory (MiB) | "
             "× full FT memory |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | {r['method']} | | | {r['status']}: {_reason(r)} | | |")
            continue
        q = rat.get(r["method"], {})
        time_ratio = q.get("train_time") if r["mode"] == "train" else q.get("infer_time")
        mem = f"{r['peak_mib']:.0f}" if r["mode"] == "train" else ""
        tunable = f"{_f(r['tunable'] / r['total'] * 100)}%" if r["mode"] == "train" else ""
        lines.append(f"| {r['mode']} | {r['method']} | {tunable} | {r['median_s']:.3f} | "
                     f"{_f(time_ratio)} | {mem} | {_f(q.get('train_mem')) if r['mode'] == 'train' else ''} |")
    return lines


def markdown(records: list[dict]) -> list[str]:
    """The page's section for the families (nothing when none was measured)."""
    from benchmarks.report import oversubscribed

    if not records:
        return []
    r0, loads = records[0]["rows"][0], [x for rec in records for x in _loads(rec)]
    cores = r0.get("cores") or os.cpu_count() or 1
    busy = any(oversubscribed(rec) for rec in records)
    def reps(kind: str) -> str:
        found = {p.get("repeats", rec["paired"].get("job", {}).get("repeats")) for rec in records
                 for p in rec.get("paired", {}).get("result", {}).get("pairs", []) if p["mode"] == kind}
        return " or ".join(str(x) for x in sorted(found, key=str)) or "–"

    lines = ["## Other vision families: Swin, EVA-02, BEiT, ConvNeXt", "",
             f"Random weights, fp32, {r0['img']}×{r0['img']} images, batch {r0['batch']}, "
             f"{r0.get('threads')} torch threads on {r0.get('device', 'cpu')}: shapes shrunk to fit 2 shared CPU cores. "
             + ("Swin-T keeps its 7×7 windows where a stage's token grid allows (timm shrinks the window to a "
                "smaller grid: at 112×112 the last stage's 4×4 grid is one window). " if r0["img"] != 224 else "")
             + "BEiT is timm's `beit_base_patch16_224` class at ViT-S width (embed 384, 6 heads, 12 blocks): "
             "BEiT-B itself took ~35 s a train step at 224×224, batch 4, on this machine. Dual-U-Tuner: `dual_u_tuner` at `blocks.*` (U-Tuning's "
             "parallel adapter, hidden 10, beside every attention and FFN); ConvNeXt has neither, so one "
             "`p_adapter` beside each block's residual branch. LoRA: rank 8 on the fused `attn.qkv` (one pair, "
             "as the ViT rows); ConvNeXt: on `mlp.fc1` and `mlp.fc2`. Both with a linear head. Full fine-tuning "
             "is the plain timm model with every parameter trained.", "",
             f"Time ratios are the paired A B B A timings (one process; {reps('train')} repetitions of the train "
             f"pairs, {reps('infer')} of the inference pair; median and the 95% bootstrap confidence interval of that median, or the interquartile range where marked IQR; verdicts as `benchmarks.paired.time_verdict`); memory ratios are the per-process tensor-byte peaks of one step. "
             f"1-minute load average {min(loads):.1f}–{max(loads):.1f} on {cores} cores"
             + (": **the machine was oversubscribed**: the per-process time ratios below are withheld and the "
                "paired ratios are noisy (read their intervals; no ≤ 1.02 verdict is given)." if busy else "."), ""]
    pairs = [p for rec in records for p in rec.get("paired", {}).get("result", {}).get("pairs", [])]
    shares = [p["cpu_share"] for p in pairs if p.get("cpu_share") is not None]
    if shares and len(shares) == len(pairs):
        threads = sorted({p.get("threads") for p in pairs}, key=str)
        started = sorted({rec["paired"].get("started", "") for rec in records} - {""})
        lines[-2] = (lines[-2].split(" 1-minute load average")[0] + " The paired timings were measured "
                     + (f"on {', '.join(started)} " if started else "")
                     + f"with {' or '.join(map(str, threads))} torch thread(s) pinned to their own core(s), other "
                     f"work pinned to the other core; each pair's process had {min(shares):.2f}–{max(shares):.2f} "
                     f"of its cores' time (CPU ÷ wall × threads; below {MIN_CPU_SHARE} gives no verdict). The "
                     "per-process rows (memory: exact) are from the run and thread count stated under each family.")
    lines += summary_table(records) + [""]
    for rec in records:
        lines += [f"### {FAMILIES.get(rec['model'], {'label': rec['model']})['label']}: per process", "",
                  f"run started {rec['started']}, took {rec['wall_s'] / 60:.1f} min.", ""] + detail_table(rec) + [""]
    return lines


def load(out: Path, mode: str) -> list[dict]:
    import json

    order = list(FAMILIES)
    records = [json.loads(p.read_text()) for p in (Path(out) / "results").glob(f"families_{mode}_*.json")]
    return sorted(records, key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))


def section(out: Path, mode: str) -> list[str]:
    """What ``benchmarks.report.write_page`` adds to the page."""
    return markdown(load(out, mode))
