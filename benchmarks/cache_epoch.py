"""Epoch time of a side tuner trained from cached features (``utuning.cache``) over the first epoch.

For each side tuner of the job (``sides``: bypass, Y-tuning, a linear probe), epochs over the same
random images, batch by batch:

* ``uncached``: every step runs the frozen backbone (no gradients) and trains the side tuner;
* ``first``: builds the feature cache (one backbone pass over the data, written to disk as
  safetensors shards), then trains one epoch from it: the first epoch of a cached run;
* ``cached``: a later epoch: features read back from the cache, only the side tuner runs.

Run as ``python -m benchmarks.cache_epoch '<json>'`` (one child process, like the speed jobs).

``python -m benchmarks.cache_epoch --recipe-memory RECIPE [--dtype float16]`` measures a cached
side-tuner run of a real recipe instead (issue 11: the fine-food study): resident memory (peak
and after the epoch, from ``/proc/self/status``) and the time of one training epoch read from the
cache in the given storage dtype (the entry is built first if missing; the build is not timed).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def run(job: dict) -> dict:
    """Every side tuner of ``job["sides"]`` in turn: {"status", "sides": {name: timings}}."""
    sides = {}
    for side in job.get("sides") or [job["side"]]:
        result = run_side(dict(job, side=side))
        if result["status"] != "ok":
            return result
        sides[side] = result
    return {"status": "ok", "sides": sides}


#: Side tuners reading fewer, deeper blocks with a smaller network: the configuration of the
#: Y-tuning paper's "<= 2% of the parameters" regime (and of benchmarks/recipes/finefoods/ytuning.yaml).
TOP_BLOCKS, TOP_HIDDEN = 3, 64
SMALL_HIDDEN = 32


def _spec(job: dict, depth: int) -> dict | tuple:
    from benchmarks.methods import _head, _side

    if job["side"] == "linear_probe":
        return _head(job)
    if job["side"] == "ytuning_top":
        return {"name": "ytuning", "at": f"blocks.{{{depth - TOP_BLOCKS}..{depth - 1}}}",
                "args": {"num_labels": job["classes"], "hidden": TOP_HIDDEN}}
    if job["side"] == "ytuning_small":  # every block, a narrow Y-network (benchmarks.side_regime)
        return _side("ytuning", job, args={"hidden": SMALL_HIDDEN})
    return _side(job["side"], job)


def run_side(job: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import utuning
    from benchmarks.methods import _timm
    from utuning.backbones.vit import ViTBackbone

    try:
        from utuning.cache import FeatureCache
    except ImportError as err:
        return {"status": "pending", "reason": f"utuning.cache is missing: {err}"}
    torch.set_num_threads(int(job.get("threads") or 1))
    torch.manual_seed(0)
    backbone = ViTBackbone(_timm(job))
    model = utuning.tune(backbone, [_spec(job, len(backbone.model.blocks))])
    data = TensorDataset(torch.randn(job["samples"], 3, job["img"], job["img"]),
                         torch.randint(0, job["classes"], (job["samples"],)))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def train_step(out, y) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(out, y).backward()
        opt.step()

    model.train()
    start = time.perf_counter()
    for x, y in DataLoader(data, batch_size=job["batch"]):
        train_step(model(x), y)
    uncached = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root)
        start = time.perf_counter()
        cached_set = cache.dataset(model, data, batch_size=job["batch"])
        build = time.perf_counter() - start

        def cached_epoch() -> float:
            t0 = time.perf_counter()
            for feats, y in DataLoader(cached_set, batch_size=job["batch"], collate_fn=cached_set.collate):
                train_step(model(features=feats), y)
            return time.perf_counter() - t0

        first_train = cached_epoch()
        later = sorted(cached_epoch() for _ in range(job.get("epochs", 3)))
        disk = sum(f.stat().st_size for f in os.scandir(os.path.join(root, os.listdir(root)[0])) if f.is_file())
    cached = later[len(later) // 2]
    first = build + first_train
    return {"status": "ok", "uncached_s": uncached, "cache_build_s": build, "first_s": first, "cached_s": cached,
            "cached_over_first": cached / first, "cached_over_uncached": cached / uncached,
            "disk_mib": disk / 2**20, "tunable": sum(p.numel() for p in model.trainable_parameters()),
            "total": sum(p.numel() for p in model.parameters())}




def markdown(job: dict, r: dict) -> str:
    sides = job.get("sides") or [job["side"]]
    head = ["## Epochs from cached features", "",
            f"{job['model']} (random weights{', depth ' + str(job['depth']) if job.get('depth') else ''}), "
            f"{job['samples']} images of {job['img']}×{job['img']}, batch {job['batch']}, {job['threads']} torch "
            f"threads; side tuners {', '.join(f'`{s}`' for s in sides)} (`bypass` and `ytuning` read every block's "
            f"tokens with their defaults, `ytuning_small` every block with hidden {SMALL_HIDDEN}, `ytuning_top` the last "
            f"{TOP_BLOCKS} blocks with hidden {TOP_HIDDEN}, "
            "`linear_probe` only the pooled features); cached epoch = median of "
            f"{job.get('epochs', 3)}. Target: a cached epoch ≤ 0.05 of the first.", ""]
    if r["status"] != "ok":
        return "\n".join(head + [f"Pending: {r.get('reason')}", ""])
    results = r.get("sides") or {job.get("side", "bypass"): r}
    lines = head + ["| side tuner | tunable | uncached epoch (s) | first epoch: cache build + train (s) | cached epoch (s) | "
                    "× first epoch | target | cache on disk (MiB, fp32) |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for side, q in results.items():
        ok = q["cached_over_first"] <= 0.05
        share = f"{100 * q['tunable'] / q['total']:.2f}%" if q.get("total") else ""
        lines.append(f"| {side} | {share} | {q['uncached_s']:.2f} | {q['cache_build_s']:.2f} + {q['first_s'] - q['cache_build_s']:.2f} "
                     f"| {q['cached_s']:.2f} | {q['cached_over_first']:.3f} | {'met' if ok else '**missed**'} | "
                     f"{q['disk_mib']:.0f} |")
    return "\n".join(lines + [""])


def _status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def recipe_memory(recipe_path: str, dtype: str | None, batch_size: int | None = None) -> dict:
    """One epoch of ``recipe_path``'s side tuner from its feature cache stored in ``dtype``."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from utuning.build import model_and_data
    from utuning.cache import FeatureCache
    from utuning.recipe import load_recipe

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_path)
    model, (train,) = model_and_data(recipe, [recipe.data.train_split])
    cache = FeatureCache(recipe.train.cache_dir, dtype=dtype)
    cached = cache.dataset(model, train, batch_size=64, collate_fn=getattr(train, "collate", None))
    disk = sum(f.stat().st_size for f in (cache.root / cached.key).glob("shard-*"))
    before = _status_mib("VmRSS")
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=recipe.optim.lr)
    model.train()
    loader = DataLoader(cached, batch_size=batch_size or recipe.train.batch_size, shuffle=True,
                        collate_fn=cached.collate, generator=torch.Generator().manual_seed(0))
    start, losses = time.perf_counter(), []
    for feats, target in loader:
        loss = F.cross_entropy(model(features=feats), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"recipe": recipe_path, "dtype": dtype or "float32", "built": cache.builds, "disk_mib": disk / 2**20,
            "epoch_s": time.perf_counter() - start, "rss_before_epoch_mib": before,
            "rss_after_epoch_mib": _status_mib("VmRSS"), "rss_peak_mib": _status_mib("VmHWM"),
            "mean_loss": sum(losses) / len(losses)}


if __name__ == "__main__":
    if sys.argv[1] == "--recipe-memory":
        dtype = sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv else None
        print(json.dumps(recipe_memory(sys.argv[2], dtype)))
    else:
        print(json.dumps(run(json.loads(sys.argv[1]))))
