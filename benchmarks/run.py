"""Regenerate the benchmark results page with one command.

    python -m benchmarks.run --quick [--out DIR]    # CI: small shapes, < 3 minutes on 2 CPU cores
    python -m benchmarks.run --full                 # vit_small + vit_base at batch 32, BERT-base
    python -m benchmarks.run --report-only          # rebuild README.md and plots from stored results
    python -m benchmarks.run --full --families      # Swin-T, EVA-02-T, BEiT, ConvNeXt-Atto (benchmarks.families)

Results are stored as JSON under ``DIR/results/`` (one file per mode and model, so a full run
can be done in parts with ``--models``), plots under ``DIR/plots/`` and the page is ``DIR/README.md``.
``--quick`` writes to ``runs/benchmarks-quick`` unless ``--out`` is given; ``--full`` to ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

from benchmarks.speed import ROOT, measure, run_child

VIT_TRAIN = ["full_timm", "full", "floor_timm", "linear_probe", "adapter", "parallel_adapter", "dual_u_tuner", "tri_u_tuner",
             "lora", "prefix", "vpt_deep", "bitfit", "ssf", "ia3", "ytuning", "bypass", "bypass_stored", "peft_lora", "peft_ia3"]
VIT_INFER = ["plain_timm", "plain", "adapter", "parallel_adapter", "dual_u_tuner", "lora", "lora_merged", "prefix",
             "vpt_deep", "peft_lora", "peft_lora_merged"]
MULTI = ["multi_bypass", "separate_bypass"]
TEXT_TRAIN = ["full_hf", "peft_prefix", "prefix", "peft_prompt", "prompt"]

QUICK_VIT_TRAIN = ["full_timm", "linear_probe", "lora", "bypass", "peft_lora"]
QUICK_VIT_INFER = ["plain_timm", "adapter", "lora_merged"]
QUICK_TEXT_TRAIN = ["full_hf", "peft_prefix", "prefix"]

#: Shapes. Quick mode shrinks everything (and says so on the page): 4 blocks, 64x64 images, batch 4.
SHAPES = {
    "quick": {"vit": {"img": 64, "batch": 4, "depth": 4, "warmup": 1, "iters": 3},
              "text": {"seq": 32, "batch": 4, "depth": 2, "hidden": 128, "warmup": 1, "iters": 3}},
    "full": {"vit": {"img": 224, "batch": 32, "depth": None, "warmup": 2, "iters": 5},
             "text": {"seq": 128, "batch": 32, "depth": None, "hidden": None, "warmup": 2, "iters": 5}},
}
FULL_MODELS = ["vit_small_patch16_224", "vit_base_patch16_224", "bert-base"]
#: Epochs from cached features (``benchmarks.cache_epoch``): the side tuner, data size and shape per mode.
CACHE = {"quick": {"model": "vit_small_patch16_224", "img": 64, "depth": 4, "samples": 32, "batch": 8},
         "full": {"model": "vit_small_patch16_224", "img": 224, "depth": None, "samples": 128, "batch": 32}}
TASKS = 3
#: Paired timings in one process (``benchmarks.paired``): model, shape and repetitions per mode.
PAIRED = {"quick": {"model": "vit_small_patch16_224", "img": 64, "depth": 4, "batch": 4, "repeats": 2},
          "full": {"model": "vit_small_patch16_224", "img": 224, "depth": None, "batch": 32, "repeats": 3}}
#: Ours vs PEFT on IA3/DoRA/VeRA/OFT and SSF (``benchmarks.peft_methods``): a vit_small-shaped ViT at a
#: small image size and batch, memory per process, time paired in one process.
PEFT_METHODS = {"quick": {"model": "vit_small_patch16_224", "img": 32, "depth": 2, "batch": 2, "repeats": 1,
                          "warmup": 1, "iters": 1},
                "full": {"model": "vit_small_patch16_224", "img": 112, "depth": None, "batch": 8, "repeats": 5,
                         "warmup": 1, "iters": 2}}
#: An inference step is cheap next to a train step: time this many more of them (ratios near 1.00,
#: such as merged LoRA over the plain backbone, need the extra samples to be read at all).
INFER_ITERS_FACTOR = 3


def jobs_for(mode: str, model: str, *, threads: int, device: str, overrides: dict) -> list[dict]:
    quick = mode == "quick"
    family = "text" if model.startswith("bert") else "vit"
    shape = {**SHAPES[mode][family], **{k: v for k, v in overrides.items() if v is not None}}
    base = {"family": family, "model": model, "classes": 10 if family == "vit" else 2, "threads": threads,
            "device": device, "tasks": 1, **shape}
    if family == "text":
        return [dict(base, mode="train", method=m) for m in (QUICK_TEXT_TRAIN if quick else TEXT_TRAIN)]
    jobs = [dict(base, mode="train", method=m) for m in (QUICK_VIT_TRAIN if quick else VIT_TRAIN)]
    infer = dict(base, iters=base["iters"] * (1 if quick else INFER_ITERS_FACTOR))
    jobs += [dict(infer, mode="infer", method=m) for m in (QUICK_VIT_INFER if quick else VIT_INFER)]
    for mode_ in ("infer",) if quick else ("train", "infer"):
        jobs += [dict(base if mode_ == "train" else infer, mode=mode_, method=m, tasks=TASKS) for m in MULTI]
    return jobs


def _section(kind: str, module: str, job: dict, mode: str, out: Path) -> dict:
    """Run ``module`` on ``job`` in a child process; write ``results/<kind>_<mode>.json`` and the
    Markdown section its ``markdown(job, result)`` makes of it."""
    markdown = importlib.import_module(module).markdown
    result = run_child(module, job, timeout=3600)
    (out / "results" / f"{kind}_{mode}.json").write_text(json.dumps({"job": job, "result": result}, indent=1))
    (out / "results" / f"{kind}_{mode}.md").write_text(markdown(job, result))
    print(f"{kind}: {result.get('status')}")
    return result


def cache_epochs(mode: str, out: Path, *, threads: int) -> dict:
    """Epochs from cached features (``benchmarks.cache_epoch``)."""
    job = {**CACHE[mode], "classes": 10, "sides": ["bypass", "ytuning", "ytuning_small", "ytuning_top", "linear_probe"],
           "threads": threads, "epochs": 3}
    return _section("cache", "benchmarks.cache_epoch", job, mode, out)


def paired(mode: str, out: Path, *, threads: int) -> dict:
    """Paired timings in one process (``benchmarks.paired``)."""
    job = {**PAIRED[mode], "family": "vit", "classes": 10, "threads": threads, "device": "cpu", "tasks": 1, "warmup": 1}
    return _section("paired", "benchmarks.paired", job, mode, out)


def peft_methods(mode: str, out: Path, *, threads: int) -> dict:
    """Ours vs PEFT on IA3, DoRA, VeRA, OFT (and SSF against LoRA) (``benchmarks.peft_methods``)."""
    job = {**PEFT_METHODS[mode], "classes": 10, "threads": threads, "device": "cpu"}
    return _section("peft_methods", "benchmarks.peft_methods", job, mode, out)


def side_regime(mode: str, out: Path, *, threads: int) -> dict:
    """Side tuners' defaults against the small-network regime on vit_small (``benchmarks.side_regime``)."""
    job = {**PAIRED[mode], "classes": 10, "threads": threads, "device": "cpu", "warmup": 1, "iters": 2}
    return _section("side_regime", "benchmarks.side_regime", job, mode, out)


def _row_key(row: dict) -> tuple:
    return row["method"], row["mode"], row["tasks"]


def combine(rounds: list[list[dict]]) -> list[dict]:
    """Rows of the same jobs measured in several rounds (each job in a fresh process per round) ->
    one row per job: the median over every timed step of every round, the median of the rounds'
    peak memories, and each round's own numbers under ``rounds``. A job that failed in any round
    keeps that round's error."""
    out = []
    for per_job in zip(*rounds):
        bad = [r for r in per_job if r["status"] != "ok"]
        if bad:
            out.append(bad[0])
            continue
        times = [t for r in per_job for t in r["times_s"]]
        row = dict(per_job[0], times_s=times, median_s=statistics.median(times),
                   peak_mib=statistics.median(r["peak_mib"] for r in per_job),
                   load=[x for r in per_job for x in r.get("load", [])],
                   rounds=[{"median_s": r["median_s"], "peak_mib": r["peak_mib"], "load": r.get("load")} for r in per_job])
        out.append(row)
    return out


def measure_rounds(jobs: list[dict], rounds: int) -> list[dict]:
    """Measure every job ``rounds`` times, the job order reversed in every other round, so that a
    machine drifting during the run (heat, other work) weighs on every configuration alike."""
    if rounds <= 1:
        return measure(jobs)
    results = []
    for k in range(rounds):
        print(f"round {k + 1}/{rounds}")
        order = jobs if k % 2 == 0 else jobs[::-1]
        rows = measure(order)
        results.append(rows if k % 2 == 0 else rows[::-1])
    return combine(results)


def merge(stored: dict, new: dict) -> dict:
    """A partial run (``--methods``) replaces its own rows in the stored record and keeps the others
    (in their order); each row keeps its own start time and machine load, and the record lists the
    runs it was assembled from."""
    fresh = {_row_key(r): dict(r, started=new["started"]) for r in new["rows"]}
    rows = [fresh.pop(_row_key(r), r) for r in stored["rows"]] + list(fresh.values())
    runs = stored.get("runs") or [{"started": stored["started"], "wall_s": stored["wall_s"], "methods": "all"}]
    runs.append({"started": new["started"], "wall_s": new["wall_s"], "methods": [r["method"] for r in new["rows"]]})
    return {**stored, "rows": rows, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="small shapes, for CI (default)")
    which.add_argument("--full", action="store_true", help="vit_small / vit_base at batch 32 and BERT-base")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the page from stored results")
    parser.add_argument("--out", type=Path, help="folder of README.md, results/ and plots/")
    parser.add_argument("--models", nargs="+", help=f"full mode: a subset of {FULL_MODELS}")
    parser.add_argument("--methods", nargs="+", help="only these methods (keys of benchmarks.methods; 'cache' and "
                        "'paired' for those sections); their rows replace the same rows of the stored results, "
                        "the other rows are kept")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per child (default 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--rounds", type=int, default=1, help="measure every job this many times, in alternating "
                        "order, and pool the timed steps (default 1)")
    parser.add_argument("--families", nargs="*", metavar="KEY", help="only the other vision families "
                        "(benchmarks.families: Swin-T, EVA-02-T, BEiT, ConvNeXt-Atto): all of them, or these keys")
    parser.add_argument("--repeats", type=int, help="--families / --llm: A B B A repetitions of the paired train timings "
                        "(the inference pair: 4x as many); with --methods, 'paired_train' / 'paired_infer' / "
                        "'paired' re-measure those pairs only")
    parser.add_argument("--processes", type=int, help="--llm: child processes for the paired timings, build order "
                        "alternated, repetitions pooled (default: 4 full, 1 quick)")
    parser.add_argument("--tag", default="", help="suffix of the results file (e.g. the machine)")
    parser.add_argument("--llm", action="store_true", help="only the decoder-LLM rows (benchmarks.llm: LoRA and "
                        "prefix on a Llama-shaped model, ours vs PEFT, train and generate)")
    args = parser.parse_args(argv)

    from benchmarks.report import write_page

    mode = "full" if args.full else "quick"
    out = args.out or (ROOT / "benchmarks" if mode == "full" else ROOT / "runs" / "benchmarks-quick")
    (out / "results").mkdir(parents=True, exist_ok=True)
    if args.llm and not args.report_only:
        from benchmarks.llm import run_llm

        print(f"wrote {run_llm(mode, out, threads=args.threads, repeats=args.repeats, processes=args.processes)}")
        print(f"wrote {write_page(out, mode)}")
        return 0
    if args.families is not None and not args.report_only:
        from benchmarks.families import FAMILIES, run_families

        run_families(mode, out, args.families or list(FAMILIES), threads=args.threads, device=args.device,
                     overrides={"batch": args.batch, "warmup": args.warmup, "iters": args.iters,
                                "repeats": args.repeats}, rounds=args.rounds, methods=args.methods)
        print(f"wrote {write_page(out, mode)}")
        return 0
    if not args.report_only:
        models = args.models or (FULL_MODELS if mode == "full" else ["vit_small_patch16_224", "bert-base"])
        overrides = {"batch": args.batch, "warmup": args.warmup, "iters": args.iters}
        for model in models:
            jobs = jobs_for(mode, model, threads=args.threads, device=args.device, overrides=overrides)
            if args.methods:
                jobs = [j for j in jobs if j["method"] in args.methods]
            if not jobs:  # e.g. --methods cache paired: only those sections
                continue
            start = time.time()
            rows = measure_rounds(jobs, args.rounds)
            record = {"mode": mode, "model": model, "tag": args.tag, "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(start)),
                      "wall_s": time.time() - start, "rounds": args.rounds, "rows": rows}
            path = out / "results" / f"speed_{mode}_{model}{'_' + args.tag if args.tag else ''}.json"
            if args.methods and path.exists():
                record = merge(json.loads(path.read_text()), record)
            path.write_text(json.dumps(record, indent=1))
    if not args.report_only and (not args.methods or "cache" in args.methods):
        cache_epochs(mode, out, threads=args.threads)
    if not args.report_only and (not args.methods or "paired" in args.methods):
        paired(mode, out, threads=args.threads)
    if not args.report_only and ((mode == "full" and not args.methods) or "peft_methods" in (args.methods or [])):
        peft_methods(mode, out, threads=args.threads)
    if not args.report_only and "side_regime" in (args.methods or []):
        side_regime(mode, out, threads=args.threads)
    page = write_page(out, mode)
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
