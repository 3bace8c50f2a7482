"""Paired timings: two configurations in one process, stepped alternately, for ratios near a target.

The speed runs (``benchmarks.speed``) build every configuration in its own process, which keeps
their memory apart but leaves their timings minutes apart: on a shared or throttling machine the
speed drifts between them by several percent, as much as a merged LoRA is supposed to differ from
the plain model (not at all). Here both configurations of a pair are built in one process and
stepped in the order A B B A, repeated; each repetition gives a ratio of the mean B time over the
mean A time, measured within seconds, and the result is the median of those ratios with its
spread. Memory is not measured here (it is per process, in the speed runs).

Pairs include a control of identical arithmetic (the plain timm model against PEFT's
``merge_and_unload`` output, which *is* a plain timm model): its ratio shows what is noise.

Run as ``python -m benchmarks.paired '<json>'`` (one child process).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

#: (reference, configuration, mode): what each pair checks is in ``PAIR_NOTES``.
PAIRS = [
    ("plain_timm", "peft_lora_merged", "infer"),
    ("plain_timm", "plain", "infer"),
    ("plain_timm", "lora_merged", "infer"),
    ("plain_timm", "adapter", "infer"),
    ("plain_timm", "parallel_adapter", "infer"),
    ("peft_lora", "lora", "infer"),
    ("full_timm", "floor_timm", "train"),
    ("full_timm", "lora", "train"),
    ("full_timm", "adapter", "train"),
    ("full_timm", "dual_u_tuner", "train"),
    ("peft_lora", "lora", "train"),
]
PAIR_NOTES = {
    "peft_lora_merged": "control: PEFT's merge_and_unload returns the plain timm model (identical arithmetic)",
    "plain": "our wrapper with no tuners",
    "lora_merged": "target 1.00",
    "adapter": "Houlsby adapters",
    "parallel_adapter": "AdaptFormer",
    "floor_timm": "no weight gradients: the floor of any tuner inside the backbone",
}


def run(job: dict) -> dict:
    import torch

    from benchmarks.methods import build
    from benchmarks.speed import make_step

    threads = int(job.get("threads") or 1)
    torch.set_num_threads(threads)
    pairs = [tuple(p) for p in job.get("pairs") or PAIRS]
    out = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for ref, other, mode in pairs:
        steps = {}
        for method in (ref, other):
            torch.manual_seed(0)
            spec = dict(job, method=method, mode=mode)
            steps[method] = make_step(build(spec), spec)
        for _ in range(job.get("warmup", 1)):
            steps[ref]()
            steps[other]()
        out.append({"ref": ref, "method": other, "mode": mode, **abba(steps, ref, other, job["repeats"])})
    return {"status": "ok", "pairs": out, **contention(wall0, cpu0, threads)}


def abba(steps: dict, ref: str, other: str, repeats: int, quantiles: str = "exclusive") -> dict:
    """Step ``steps[ref]`` and ``steps[other]`` in the order A B B A, ``repeats`` times: the median of
    (B time ÷ A time) over the repetitions, its quartiles (``statistics.quantiles`` ``method``), every
    ratio and each side's median step time."""
    ratios, times = [], {ref: [], other: []}
    for _ in range(repeats):
        for method in (ref, other, other, ref):
            start = time.perf_counter()
            steps[method]()
            times[method].append(time.perf_counter() - start)
        ratios.append(sum(times[other][-2:]) / sum(times[ref][-2:]))
    q = statistics.quantiles(ratios, n=4, method=quantiles) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratio": statistics.median(ratios), "q1": q[0], "q3": q[2], "ratios": ratios,
            "ref_s": statistics.median(times[ref]), "method_s": statistics.median(times[other])}


def contention(wall0: float, cpu0: float, threads: int) -> dict:
    """How much of its cores this process had since ``wall0`` / ``cpu0``: ``cpu_share`` = CPU time ÷
    (wall time × threads), about 1.0 when nothing else ran on them (a measurement of this process, which
    the machine's load average is not when other work is pinned to other cores), and the cores the
    process may run on."""
    import os

    wall = time.perf_counter() - wall0
    return {"cpu_share": (time.process_time() - cpu0) / (wall * threads) if wall > 0 else None,
            "affinity": sorted(os.sched_getaffinity(0)), "threads": threads}


def markdown(job: dict, r: dict) -> str:
    head = ["## Paired timings (one process, alternating steps)", "",
            f"{job['model']} (random weights), batch {job['batch']}, {job['threads']} torch threads; each pair built "
            f"in one process and stepped A B B A × {job['repeats']} after {job.get('warmup', 1)} warm-up step(s); "
            "the ratio is the median over the repetitions of (B time ÷ A time), with its interquartile range. "
            "This removes the drift between processes that the per-process runs above cannot; use these "
            "numbers for ratios that should be 1.00.", ""]
    if r["status"] != "ok":
        return "\n".join(head + [f"Pending: {r.get('reason')}", ""])
    lines = head + ["| mode | A | B | B ÷ A (median) | interquartile range | what it checks |",
                    "|---|---|---|---:|---|---|"]
    for p in r["pairs"]:
        lines.append(f"| {p['mode']} | {p['ref']} | {p['method']} | {p['ratio']:.3f} | {p['q1']:.3f}–{p['q3']:.3f} | "
                     f"{PAIR_NOTES.get(p['method'], '') if p['ref'] != 'peft_lora' else 'ours vs PEFT, same LoRA'} |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
