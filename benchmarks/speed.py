"""Speed and peak memory of one configuration per process.

``measure(jobs)`` runs every job (see ``benchmarks.methods``) in its own child process, one
after the other, so that the peak memory of one configuration never includes another's. The
child (``python -m benchmarks.speed '<job json>'``) builds the model, then:

* memory, CPU: the first step after the model and optimiser are built runs under
  ``torch.profiler`` with ``profile_memory=True``; every CPU tensor allocation and free it
  records is summed in time order, and the peak of that sum is the memory the step adds on top
  of the weights (activations kept for backward, gradients, AdamW state, temporaries): live
  tensor bytes, the CPU counterpart of ``torch.cuda.max_memory_allocated``, and the same in
  every process for the same configuration. The process's peak RSS over the timed steps
  (``VmHWM`` reset through ``/proc/self/clear_refs``, minus the RSS before them) is kept as
  ``rss_peak_mib``: it includes the allocator's caching and varies by about ±15% between
  processes.
* memory, GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated after build.
* time: ``warmup`` steps, then the median of ``iters`` timed steps (``time.perf_counter``; CUDA
  synchronised). A train step is forward, cross-entropy, backward and an AdamW step; an
  inference step is a forward under ``torch.inference_mode``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _profiled_peak(step) -> int:
    """Run ``step()`` once under ``torch.profiler`` (``profile_memory``); the peak, in bytes, of the
    running sum of its CPU tensor allocations and frees (0 at the start of the step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        pass  # the profiler's own one-time start-up, outside the measured step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def make_step(built, job: dict):
    """Move ``built`` to the job's device and return one step of it: forward, loss, backward and an
    AdamW step (``mode: train``), or a forward under ``inference_mode`` (``mode: infer``)."""
    import torch

    device = torch.device("cuda" if job.get("device") == "cuda" else "cpu")
    built.model.to(device)
    built.args = tuple(a.to(device) for a in built.args)
    built.kwargs = {k: v.to(device) for k, v in built.kwargs.items()}
    built.labels = built.labels.to(device)
    train = job["mode"] == "train"
    opt = torch.optim.AdamW(built.trainable, lr=1e-4) if train else None
    built.model.train(train)

    def step() -> None:
        if train:
            opt.zero_grad(set_to_none=True)
            built.loss(built.forward()).backward()
            opt.step()
        else:
            with torch.inference_mode():
                built.forward()

    return step


def run_job(job: dict) -> dict:
    """Build and time one configuration in this process (the child side)."""
    import torch

    from benchmarks.methods import Pending, Unavailable, build

    load_start = os.getloadavg()[0]
    torch.set_num_threads(int(job.get("threads") or os.cpu_count() or 1))
    torch.manual_seed(0)
    cuda = job.get("device") == "cuda"
    try:
        built = build(job)
    except Pending as err:
        return {"status": "pending", "reason": str(err)}
    except Unavailable as err:
        return {"status": "skipped", "reason": str(err)}
    step = make_step(built, job)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated - allocated after build"
    else:
        tensor_peak = _profiled_peak(step)  # the first step: it allocates the gradients and AdamW state
        method = "peak of live CPU tensor bytes in the first step (torch.profiler profile_memory)"
        gc.collect()
        base = _status_kib("VmRSS") * 1024
        rss_method = "VmHWM (reset before the timed steps) - RSS then" if _reset_peak_rss() \
            else "ru_maxrss - RSS before the timed steps (peak reset refused: may include the build's own peak)"
    times = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(job["warmup"] + job["iters"]):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= job["warmup"]:
            times.append(time.perf_counter() - start)
    from benchmarks.paired import contention

    extra = {} if cuda else contention(wall0, cpu0, torch.get_num_threads())
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = tensor_peak
        rss = _status_kib("VmHWM") * 1024 if rss_method.startswith("VmHWM") \
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        extra.update(rss_peak_mib=max(rss - base, 0) / 2**20, rss_method=rss_method)
    return {
        "status": "ok",
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_mib": max(peak, 0) / 2**20,
        **extra,
        "weights_mib": sum(p.numel() * p.element_size() for p in built.model.parameters()) / 2**20,
        "tunable": sum(p.numel() for p in built.trainable),
        "total": built.total,
        "memory_method": method,
        "threads": torch.get_num_threads(),
        "device": "cuda" if cuda else "cpu",
        "cores": os.cpu_count(),
        "load": [load_start, os.getloadavg()[0]],  # 1-minute load average: other work on the machine
    }


def run_child(module: str, job: dict, *, timeout: float = 1800) -> dict:
    """``python -m <module> '<job json>'`` in a fresh process (repository on the path, offline hubs,
    the job's thread count); its last JSON line, or an error result naming why there is none."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if job.get("threads"):
        env["OMP_NUM_THREADS"] = str(job["threads"])
    try:
        proc = subprocess.run([sys.executable, "-m", module, json.dumps(job)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"status": "error", "reason": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}


def measure(jobs: list[dict], *, timeout: float = 1800, log=print) -> list[dict]:
    """Run each job in a fresh child process, in order; returns job + result rows."""
    rows = []
    for i, job in enumerate(jobs):
        start = time.perf_counter()
        result = run_child("benchmarks.speed", job, timeout=timeout)
        rows.append({**job, **result})
        shown = f"{result['median_s']:.3f} s, {result['peak_mib']:.0f} MiB" if result["status"] == "ok" else result
        log(f"[{i + 1}/{len(jobs)}] {job['family']} {job['model']} {job['mode']:<5} {job['method']:<18} "
            f"{shown} ({time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    print(json.dumps(run_job(json.loads(sys.argv[1]))))
