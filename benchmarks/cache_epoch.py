"""Epoch time of a side tuner trained from cached features (``utuning.cache``) over the first epoch.

Three epochs over the same random images, batch by batch, with the same side tuner (bypass):

* ``uncached``: every step runs the frozen backbone (no gradients) and trains the side tuner;
* ``first``: builds the feature cache (one backbone pass over the data, written to disk as
  safetensors shards), then trains one epoch from it: the first epoch of a cached run;
* ``cached``: a later epoch: features read back from the cache, only the side tuner runs.

Run as ``python -m benchmarks.cache_epoch '<json>'`` (one child process, like the speed jobs).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def run(job: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import utuning
    from benchmarks.methods import _side, _timm
    from utuning.backbones.vit import ViTBackbone

    try:
        from utuning.cache import FeatureCache
    except ImportError as err:
        return {"status": "pending", "reason": f"utuning.cache is missing: {err}"}
    torch.set_num_threads(int(job.get("threads") or 1))
    torch.manual_seed(0)
    model = utuning.tune(ViTBackbone(_timm(job)), [_side(job["side"], job)])
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
                train_step(model.side_forward(feats), y)
            return time.perf_counter() - t0

        first_train = cached_epoch()
        later = sorted(cached_epoch() for _ in range(job.get("epochs", 3)))
        disk = sum(f.stat().st_size for f in os.scandir(os.path.join(root, os.listdir(root)[0])) if f.is_file())
    cached = later[len(later) // 2]
    first = build + first_train
    return {"status": "ok", "uncached_s": uncached, "cache_build_s": build, "first_s": first, "cached_s": cached,
            "cached_over_first": cached / first, "cached_over_uncached": cached / uncached,
            "disk_mib": disk / 2**20, "tunable": sum(p.numel() for p in model.trainable_parameters())}


def markdown(job: dict, r: dict) -> str:
    head = ["## Epochs from cached features", "",
            f"{job['model']} (random weights{', depth ' + str(job['depth']) if job.get('depth') else ''}), "
            f"{job['samples']} images of {job['img']}×{job['img']}, batch {job['batch']}, side tuner `{job['side']}` "
            f"over all blocks, {job['threads']} torch threads; cached epoch = median of {job.get('epochs', 3)}.", ""]
    if r["status"] != "ok":
        return "\n".join(head + [f"Pending: {r.get('reason')}", ""])
    ok = r["cached_over_first"] <= 0.05
    return "\n".join(head + [
        "| epoch | time (s) | × first epoch |", "|---|---:|---:|",
        f"| uncached (backbone every step) | {r['uncached_s']:.2f} | {r['uncached_s'] / r['first_s']:.3f} |",
        f"| first (cache build {r['cache_build_s']:.2f} s + train) | {r['first_s']:.2f} | 1.000 |",
        f"| cached (later epochs) | {r['cached_s']:.2f} | {r['cached_over_first']:.3f} |", "",
        f"Target ≤ 0.05 of the first epoch: {'met' if ok else '**missed**'}. "
        f"Cache on disk: {r['disk_mib']:.0f} MiB (fp32, every block's tokens).", ""])


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
