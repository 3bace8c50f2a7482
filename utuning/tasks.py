"""Tasks: the one definition of each task's loss, what its metrics read, and how its outputs are
padded when gathered across processes. ``task.type`` in a recipe names one of ``TASKS``; a new task
(e.g. causal language modelling) is ``register_task("name")(Task(...))`` with no engine change.

=============  ==============================================  ===============================
task           outputs, labels                                  loss
=============  ==============================================  ===============================
classification (B, C) logits, (B,) class ids                    cross-entropy (label smoothing)
regression     (B,) / (B, 1) / (B, K) values, same-shaped       MSE
labelling      (B, N, C) logits, (B, N) ids, -100 = ignored     token cross-entropy
qa             (B, N, 2) start/end logits, (B, 2) ids           mean of start and end CE
=============  ==============================================  ===============================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from utuning.errors import ConfigError, closest
from utuning.registry import Registry

IGNORE_INDEX = -100  # label of positions no loss or metric counts (special, pad and prompt tokens)


@dataclass(frozen=True)
class Task:
    """loss(outputs, labels, label_smoothing) -> scalar; predictions(outputs, labels) -> what the
    metrics read; ``metrics``: the defaults; ``pad_outputs``/``pad_labels``: fill values to pad dim 1
    when processes hold different sequence lengths (None: outputs have no sequence dimension)."""

    loss: Callable[[Tensor, Tensor, float], Tensor]
    predictions: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    metrics: tuple[str, ...] = ("accuracy",)
    pad_outputs: float | None = None
    pad_labels: int | None = None


TASKS: Registry = Registry("task")


def register_task(name: str) -> Callable[[Task], Task]:
    return TASKS.register(name)


def _squeeze(outputs: Tensor, labels: Tensor) -> Tensor:
    return outputs.squeeze(-1) if outputs.dim() == labels.dim() + 1 and outputs.shape[-1] == 1 else outputs


def _qa_loss(outputs: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    start, end = outputs.unbind(-1)  # two (B, N)
    labels = labels.long()
    return (F.cross_entropy(start, labels[:, 0], ignore_index=IGNORE_INDEX)
            + F.cross_entropy(end, labels[:, 1], ignore_index=IGNORE_INDEX)) / 2


register_task("classification")(Task(
    loss=lambda o, y, s: F.cross_entropy(o, y.long(), label_smoothing=s),
    predictions=lambda o, y: (o, y)))
register_task("regression")(Task(
    loss=lambda o, y, s: F.mse_loss(_squeeze(o, y), y.float()),
    predictions=lambda o, y: (_squeeze(o, y), y), metrics=("mse",)))
register_task("labelling")(Task(
    loss=lambda o, y, s: F.cross_entropy(o.flatten(0, -2), y.long().flatten(), ignore_index=IGNORE_INDEX,
                                         label_smoothing=s),
    predictions=lambda o, y: (o.argmax(-1), y), pad_outputs=0.0, pad_labels=IGNORE_INDEX))
register_task("qa")(Task(
    loss=_qa_loss, predictions=lambda o, y: (o.argmax(dim=-2), y),  # (B, N, 2) -> (B, 2)
    pad_outputs=torch.finfo(torch.float32).min))  # padded positions never win the arg-max


def check_task(name: str) -> Task:
    """The registered task ``name``; an unknown one is a ``ConfigError`` naming the closest."""
    if name not in TASKS:
        raise ConfigError(f"Unknown task.type {name!r}. Did you mean {closest(name, TASKS)}? Known: {list(TASKS)}")
    return TASKS.get(name)


def task_loss(task: str, outputs: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    return TASKS.get(task).loss(outputs.float(), labels, label_smoothing)


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
    return TASKS.get(task).predictions(outputs.detach().float(), labels)
