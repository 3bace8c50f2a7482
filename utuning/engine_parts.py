"""Pieces of the training engine: losses by task, optimizer and schedule over tuner parameters
only, an EMA of tuner weights, cached frozen features (``train.cache_features``), and the
metrics log (JSON lines + TensorBoard)."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from utuning.backbone import Backbone
from utuning.errors import ConfigError, closest
from utuning.model import TunedModel
from utuning.schema import OptimConfig, ScheduleConfig, TrainConfig

TASKS = ("classification", "regression", "labelling", "qa")
IGNORE_INDEX = -100
# Metrics where lower is better (the best checkpoint minimises them); every other metric is maximised.
LOWER_IS_BETTER = frozenset({"loss", "mse", "mae", "rmse", "perplexity"})
# Placements whose parameters are learned tokens (prompts, prefixes): never weight-decayed.
TOKEN_PLACEMENTS = frozenset({"prompt", "prefix"})


# Losses ------------------------------------------------------------------------------------
def check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"Unknown task.type {task!r}. Did you mean {closest(task, TASKS)}? Known: {list(TASKS)}")
    return task


def task_loss(task: str, outputs: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """The loss of one output tensor.

    classification  (B, C) logits, (B,) class ids: cross-entropy with label smoothing
    regression      (B,) or (B, 1) or (B, K) values, same-shaped targets: MSE
    labelling       (B, N, C) logits, (B, N) ids with -100 on ignored tokens: token cross-entropy
    qa              (B, N, 2) start/end logits, (B, 2) start/end ids: mean of the two cross-entropies
    """
    outputs = outputs.float()
    if task == "classification":
        return F.cross_entropy(outputs, labels.long(), label_smoothing=label_smoothing)
    if task == "regression":
        if outputs.dim() == labels.dim() + 1 and outputs.shape[-1] == 1:
            outputs = outputs.squeeze(-1)
        return F.mse_loss(outputs, labels.float())
    if task == "labelling":
        return F.cross_entropy(outputs.flatten(0, -2), labels.long().flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing)
    if task == "qa":
        start, end = outputs.unbind(-1)  # two (B, N)
        labels = labels.long()
        return (F.cross_entropy(start, labels[:, 0], ignore_index=IGNORE_INDEX)
                + F.cross_entropy(end, labels[:, 1], ignore_index=IGNORE_INDEX)) / 2
    raise ConfigError(f"Unknown task.type {task!r}; known: {list(TASKS)}")


def compute_loss(task: str, outputs: Tensor | Mapping[str, Tensor], labels: Tensor | Mapping[str, Tensor],
                 *, label_smoothing: float = 0.0) -> Tensor:
    """The task loss; side tuners returning a dict (several tasks sharing one backbone pass) give
    the SUM of the per-key losses, each against ``labels[key]`` when labels are a dict keyed alike,
    else against the same labels."""
    if not isinstance(outputs, Mapping):
        return task_loss(task, outputs, labels, label_smoothing=label_smoothing)
    total = outputs[next(iter(outputs))].new_zeros((), dtype=torch.float32)
    for key, out in outputs.items():
        target = labels[key] if isinstance(labels, Mapping) else labels
        total = total + task_loss(task, out, target, label_smoothing=label_smoothing)
    return total


def predictions(task: str, outputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """What metrics read (``utuning.data.compute_metrics``), per task:

    classification  (B, C) float scores, (B,) labels
    regression      (B,) or (B, K) values, same-shaped labels
    labelling       (B, N) predicted ids, (B, N) labels with -100 where ignored
    qa              (B, 2) predicted start/end ids, (B, 2) labels
    """
    outputs = outputs.detach().float()
    if task == "regression" and outputs.dim() == labels.dim() + 1 and outputs.shape[-1] == 1:
        outputs = outputs.squeeze(-1)
    if task == "labelling":
        return outputs.argmax(-1), labels
    if task == "qa":
        return outputs.argmax(dim=-2), labels  # (B, N, 2) -> (B, 2)
    return outputs, labels


def concat_padded(parts: list[Tensor], fill: int) -> Tensor:
    """Concatenate (B_i, N_i, ...) batches along B, padding N to the longest with ``fill``."""
    if parts[0].dim() < 2 or len({p.shape[1] for p in parts}) == 1:
        return torch.cat(parts)
    n = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, n - p.shape[1]), value=fill) if p.dim() == 2 else p for p in parts])


def basic_metrics(task: str, names: list[str], preds: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy / MSE, used when ``utuning.data.compute_metrics`` is not available."""
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy" and task in ("classification", "labelling", "qa"):
            ids = preds.argmax(-1) if preds.dim() == labels.dim() + 1 else preds
            keep = labels != IGNORE_INDEX
            out[name] = (ids[keep] == labels[keep]).float().mean().item() if keep.any() else 0.0
        elif name == "mse" and task == "regression":
            out[name] = F.mse_loss(preds.float(), labels.float()).item()
        else:
            raise ConfigError(f"Metric {name!r} needs utuning.data.compute_metrics, which is not available")
    return out


def default_metrics(task: str) -> list[str]:
    return ["mse"] if task == "regression" else ["accuracy"]


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None or math.isnan(old):
        return not math.isnan(new)
    return new < old if metric in LOWER_IS_BETTER else new > old


# Optimizer and schedule --------------------------------------------------------------------
def param_groups(model: TunedModel, weight_decay: float) -> list[dict[str, Any]]:
    """Tuner parameters only, walked from the attached tuners. No weight decay for biases, norm
    scales and other 1-d parameters, for learned tokens (prompt/prefix placements, or parameters
    shaped (1, P, ...) that are broadcast over the batch), and for names a tuner lists in its
    optional ``no_weight_decay()``."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for attached in model.attached():
        skip = set(getattr(attached.tuner, "no_weight_decay", lambda: ())())
        for name, p in attached.trainable().items():
            if id(p) in seen:
                continue
            seen.add(id(p))
            tokens = attached.tuner.placement in TOKEN_PLACEMENTS or (p.dim() >= 3 and p.shape[0] == 1)
            (no_decay if p.dim() <= 1 or tokens or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: TunedModel, cfg: OptimConfig) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2, list_optimizers

    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("The recipe's tuners have no trainable parameters; nothing to train")
    known = list_optimizers()
    if cfg.name.lower() not in known:
        raise ConfigError(f"Unknown optim.name {cfg.name!r}. Did you mean {closest(cfg.name, known)}?")
    kwargs: dict[str, Any] = {}
    if cfg.betas is not None:
        kwargs["betas"] = tuple(cfg.betas)
    return create_optimizer_v2(groups, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, total_updates: int,
                    updates_per_epoch: int):
    """A timm scheduler stepped per update (``step_update(n)``), or None for ``name: none``.
    The schedule counts updates: warm-up lasts ``warmup_epochs * updates_per_epoch`` updates."""
    if cfg.name == "none":
        return None
    from timm.scheduler import create_scheduler_v2

    warmup = int(round(cfg.warmup_epochs * updates_per_epoch))
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.name, num_epochs=max(total_updates, 1), updates_per_epoch=1, step_on_epochs=False,
            warmup_epochs=warmup, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
        )
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"schedule.name {cfg.name!r} is not a timm scheduler: {err}") from None
    if scheduler is None:
        raise ConfigError(f"schedule.name {cfg.name!r} is not a timm scheduler (or use 'none')")
    return scheduler


# EMA ---------------------------------------------------------------------------------------
class TunerEMA:
    """Exponential moving average of the tuner parameters only (the frozen backbone is shared):
    ``shadow = decay * shadow + (1 - decay) * param`` after every update."""

    def __init__(self, model: TunedModel, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema must lie in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, _ in model.named_trainable_parameters()]
        self.shadow = [p.detach().clone().float() for p in model.trainable_parameters()]

    @torch.no_grad()
    def update(self, model: TunedModel) -> None:
        for s, p in zip(self.shadow, model.trainable_parameters()):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self, model: TunedModel) -> Iterator[None]:
        """Swap the EMA weights in (e.g. to evaluate or save), restore the raw ones afterwards."""
        params = model.trainable_parameters()
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(params, raw):
                    p.copy_(r)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": dict(zip(self.names, (s.cpu() for s in self.shadow)))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][name])


# Cached features -----------------------------------------------------------------------------
class FeatureBatches(Dataset):
    """A ``utuning.cache.CachedFeatureDataset`` in the engine's batch form: ``collate`` gives
    ``{"labels": target, "features": Features}`` (labels first: accelerate reads a batch size
    from the first tensor it finds). Samples keep the order of the source dataset, so a seeded
    sampler (and ``resume``) sees the same batches as without the cache."""

    def __init__(self, cached: Any, source: Dataset) -> None:
        self.cached = cached
        self.label_names = getattr(source, "label_names", None)
        self.num_classes = getattr(source, "num_classes", None)

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> Any:
        return self.cached[index]

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        features, target = self.cached.collate(items)
        return {"labels": target, "features": features}


def check_cacheable(model: TunedModel, datasets: Sequence[Dataset], train: TrainConfig) -> None:
    """``train.cache_features`` needs tuners that only read frozen features, and data without
    random augmentation unless ``train.cache_augmented_views``. Raises before anything is built."""
    from utuning.cache import random_augmentation

    if not model.reads_features_only():
        specs = model.backbone.site_specs()
        inside = [a.key for a in model.attached() if a.handle is not None and specs[a.sites[0]].kind != "head"]
        raise ConfigError(
            f"train.cache_features: true, but tuners {inside[:3]}{' ...' if len(inside) > 3 else ''} sit inside the "
            "backbone and change its features while training, so they cannot be cached. Only side tuners (e.g. "
            "ytuning, bypass) and head tuners (linear_probe) train from cached features; set train.cache_features: false"
        )
    if not len(model.side) and type(model.backbone).head is Backbone.head:
        raise ConfigError(
            f"train.cache_features: true trains the head site on cached pooled features through "
            f"Backbone.head(pooled), which backbone {model.backbone.name!r} ({type(model.backbone).__name__}) does "
            "not implement; set train.cache_features: false"
        )
    if train.cache_augmented_views:
        return
    for dataset in datasets:
        aug = random_augmentation(dataset)
        if aug:
            raise ConfigError(
                f"train.cache_features: true, but dataset {type(dataset).__name__} uses random augmentation ({aug}), "
                "and caching would freeze one random view per sample. Turn the augmentation off (e.g. "
                "data.args.augment: false), or set train.cache_augmented_views: true to train on one fixed, seeded "
                "augmented view per sample"
            )


def cached_datasets(model: TunedModel, datasets: Sequence[Dataset], collates: Sequence[Callable], train: TrainConfig,
                    *, batch_size: int, device: torch.device | str,
                    main_process_first: Callable[[], AbstractContextManager]) -> tuple[list[FeatureBatches], dict]:
    """The frozen features of ``datasets`` from ``FeatureCache(train.cache_dir)``, built on
    ``device`` (the main process first, so the others reuse its entries) or reused, as
    ``FeatureBatches``; and a report ``{"dir", "entries", "built"}`` (built: entries computed now).
    The global RNG states are restored afterwards, so a build and a hit train identically."""
    from utuning.cache import FeatureCache

    check_cacheable(model, datasets, train)
    cache = FeatureCache(train.cache_dir)
    saved = rng_state()
    try:
        with main_process_first():
            cached = [cache.dataset(model, ds, batch_size=batch_size, collate_fn=collate, device=device,
                                    cache_augmented_views=train.cache_augmented_views, view_seed=train.seed)
                      for ds, collate in zip(datasets, collates)]
    finally:
        set_rng_state(saved)
    report = {"dir": str(cache.root), "entries": [c.key for c in cached], "built": cache.builds}
    return [FeatureBatches(c, ds) for c, ds in zip(cached, datasets)], report


def forward_batch(model: nn.Module, batch: Mapping[str, Any], device: torch.device | str) -> Any:
    """The (possibly DDP-wrapped) model on one batch: cached ``features`` (moved to ``device``)
    or backbone ``inputs`` (placed by the accelerate data loader)."""
    if "features" in batch:
        return model(features=batch["features"].to(device))
    return model(**batch["inputs"])


# Logging -----------------------------------------------------------------------------------
class MetricsLog:
    """Appends records to ``<out>/metrics.jsonl`` and, optionally, TensorBoard under ``<out>/tb``.
    On resume, records after the resumed step (from the killed run) are dropped first."""

    def __init__(self, out: Path, *, tensorboard: bool, resume_step: int | None = None) -> None:
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
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# Run state and reporting ---------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
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
