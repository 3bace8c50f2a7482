"""Optimizer and schedule over tuner parameters only (timm's optimizers and schedulers)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from utuning.errors import ConfigError, closest
from utuning.model import TunedModel
from utuning.schema import OptimConfig, ScheduleConfig

# Placements whose parameters are learned tokens (prompts, prefixes): never weight-decayed.
TOKEN_PLACEMENTS = frozenset({"prompt", "prefix"})


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


