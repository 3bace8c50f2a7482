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
    """Step ``steps[ref]`` and ``steps[other]`` in the order A B B A, ``repeats`` times: the ratios
    (B time ÷ A time) of the repetitions and every step time, summarised by ``summarise``."""
    ratios, times = [], {ref: [], other: []}
    for _ in range(repeats):
        for method in (ref, other, other, ref):
            start = time.perf_counter()
            steps[method]()
            times[method].append(time.perf_counter() - start)
        ratios.append(sum(times[other][-2:]) / sum(times[ref][-2:]))
    return summarise(ratios, times[ref], times[other], quantiles)


def summarise(ratios: list[float], ref_times: list[float], method_times: list[float],
              quantiles: str = "exclusive") -> dict:
    """The median of the ratios, their quartiles (``statistics.quantiles`` ``method``), a bootstrap
    95% confidence interval of that median (``median_ci``), every ratio and step time, and each side's
    median step time."""
    q = statistics.quantiles(ratios, n=4, method=quantiles) if len(ratios) > 1 else [ratios[0]] * 3
    lo, hi = median_ci(ratios)
    return {"ratio": statistics.median(ratios), "q1": q[0], "q3": q[2], "ci": [lo, hi], "ratios": ratios,
            "ref_times": ref_times, "method_times": method_times,
            "ref_s": statistics.median(ref_times), "method_s": statistics.median(method_times)}


def median_ci(values: list[float], level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap ``level`` confidence interval of the median of ``values`` (seeded: the same
    values give the same interval). It says how well the median is known, which the interquartile
    range (the spread of single repetitions) does not."""
    import random

    if len(values) < 2:
        return values[0], values[0]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    cut = int(round((1 - level) / 2 * resamples))
    return medians[cut], medians[resamples - 1 - cut]


def pool(parts: list[dict], quantiles: str = "exclusive") -> dict:
    """One pair measured in several processes (``abba`` results, with the build order alternated
    between them): every repetition's ratio together, summarised again, plus each process's median
    (``process_ratios``), which shows a bias of one process's memory layout that repetitions within
    it cannot."""
    ratios = [r for p in parts for r in p["ratios"]]
    out = summarise(ratios, [t for p in parts for t in p["ref_times"]], [t for p in parts for t in p["method_times"]],
                    quantiles)
    return {**out, "processes": len(parts), "process_ratios": [p["ratio"] for p in parts]}


def interval(p: dict) -> tuple[float, float, str]:
    """A pair's 95% confidence interval of its median ratio, and what it is: ``ci`` as kept, else
    computed from the kept ratios (records made before ``ci`` was kept), else the interquartile range
    (``"IQR"``: a single repetition's spread, wider than the median's interval)."""
    if p.get("ci"):
        return p["ci"][0], p["ci"][1], "CI"
    if len(p.get("ratios") or []) > 1:
        return (*median_ci(p["ratios"]), "CI")
    return p["q1"], p["q3"], "IQR"


def cell(p: dict | None, digits: int = 3) -> str:
    """``median (lo–hi)`` of ``interval``, the bounds marked IQR when they are the interquartile range."""
    if not p or p.get("status", "ok") != "ok":
        return "–"
    lo, hi, kind = interval(p)
    return f"{p['ratio']:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f}{' IQR' if kind == 'IQR' else ''})"


#: The page's words for ``time_verdict``'s rule, against a target of 1.
VERDICT_RULE = ("Time verdicts: met (the whole interval ≤ 1), met at the median (median ≤ 1, the interval reaches "
                "above: not distinguishable from parity, as an A/A control), within noise (median above 1, the "
                "interval reaches 1), missed (the whole interval above 1).")


def time_verdict(p: dict | None, target: float = 1.0) -> str:
    """A time target (B ÷ A ≤ ``target``) read from a pair's median and its confidence interval
    (``interval``): **met** when the whole interval is at
    or under the target, **met at the median** when the median is but the interval reaches above it
    (not distinguishable from the target: read it against the A/A control), **within noise** when the
    median is above but the interval reaches the target, **missed** when the whole interval is above."""
    if not p or p.get("status", "ok") != "ok":
        return "–"
    lo, hi, _ = interval(p)
    if hi <= target:
        return "met"
    if lo > target:
        return "**missed**"
    return "met at the median" if p["ratio"] <= target else "within noise"


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
