"""The metrics log (JSON lines + TensorBoard), progress bar, per-run peak memory and the summary line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends records to ``<out>/metrics.jsonl`` and, optionally, TensorBoard under ``<out>/tb`` and
    accelerate's trackers (``trackers``: an Accelerator whose trackers were initialised). On resume,
    records after the resumed step (from the killed run) are dropped first."""

    def __init__(self, out: Path, *, tensorboard: bool, resume_step: int | None = None, trackers: Any = None) -> None:
        self.trackers = trackers
        self.path = out / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tb"), purge_step=resume_step)

    def log(self, split: str, step: int, values: Mapping[str, Any], **extra: Any) -> None:
        record = {"split": split, "step": step, **extra, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"{split}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.trackers is not None:
            self.trackers.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.trackers is not None:
            self.trackers.end_training()




class PeakMemory:
    """Peak memory of ONE run, also when one process trains several recipes: CUDA's peak counter is
    reset at the start; on Linux the process's resident high-water mark is reset through
    ``/proc/self/clear_refs`` (``5``) and read from ``VmHWM``. Where neither works, the process
    maximum so far is reported and ``scope`` says so."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.scope = "run"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.scope = "process"

    def mb(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.scope == "run":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    quiet = not enabled or not sys.stderr.isatty() or bool(os.environ.get("CI"))
    return tqdm(total=total, initial=initial, disable=quiet, desc="train", dynamic_ncols=True)


def format_summary(summary: Mapping[str, Any]) -> str:
    final = summary.get("final_eval") or {}
    best = (summary.get("best_eval") or {}).get("metrics") or {}
    fmt = ", ".join
    return "\n".join([
        f"run {summary['name']!r}: {summary['steps']} updates, {summary['epochs']} epochs, "
        f"{summary['train_time_s']:.1f}s, peak memory {summary['peak_memory_mb']:.0f} MB",
        f"tunable {summary['tunable_params']:,} of {summary['total_params']:,} parameters ({summary['tunable_share']:.4%})",
        "final eval: " + fmt(f"{k}={v:.4f}" for k, v in final.items()),
        "best eval:  " + fmt(f"{k}={v:.4f}" for k, v in best.items()),
    ])
