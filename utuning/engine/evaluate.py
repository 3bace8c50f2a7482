"""Evaluation (``run_eval``, ``evaluate``) and the pieces train and evaluate share: the accelerator,
data loaders, cached features."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from utuning import checkpoint as ckpt
from utuning.build import model_and_data
from utuning.data import compute_metrics
from utuning.engine.cached import cached_datasets, forward_batch
from utuning.errors import ConfigError
from utuning.model import TunedModel
from utuning.schema import Recipe
from utuning.tasks import IGNORE_INDEX, TASKS, check_task, compute_loss, predictions


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin

    t = recipe.train
    if t.precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"train.precision must be 'no', 'fp16' or 'bf16', got {t.precision!r}")
    return Accelerator(
        cpu=not torch.accelerator.is_available(),  # lets torchrun / accelerate launch start gloo DDP on CPU
        mixed_precision=t.precision,
        gradient_accumulation_steps=t.grad_accum,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=t.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if t.compile else None,
        step_scheduler_with_optimizer=False,
        log_with=list(recipe.output.trackers) or None,
        project_dir=recipe.output.dir,
    )


def collate_of(dataset: Dataset):
    """The dataset's own ``collate`` (it knows its pad id), else ``utuning.data.collate``."""
    from utuning.data import collate

    found = getattr(dataset, "collate", None)
    return found if callable(found) else collate


def make_loader(recipe: Recipe, dataset: Dataset, *, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_of(dataset),
                      num_workers=recipe.data.num_workers, generator=torch.Generator().manual_seed(recipe.train.seed))


def cached(recipe: Recipe, model: TunedModel, datasets: list[Dataset], accelerator) -> tuple[list[Dataset], dict]:
    """``train.cache_features``: the datasets as cached frozen features (see ``cached_datasets``)."""
    model.to(accelerator.device)
    return cached_datasets(model, datasets, [collate_of(d) for d in datasets], recipe.train,
                           batch_size=recipe.eval.batch_size, device=accelerator.device,
                           main_process_first=accelerator.main_process_first)


def metric_names(recipe: Recipe, dataset: Dataset) -> list[str]:
    return list(recipe.eval.metrics or getattr(dataset, "metrics", None) or TASKS.get(recipe.task.type).metrics)


def concat_padded(parts: list[torch.Tensor], fill: int) -> torch.Tensor:
    """Concatenate (B_i, N_i, ...) batches along B, padding N to the longest with ``fill``."""
    if parts[0].dim() < 2 or len({p.shape[1] for p in parts}) == 1:
        return torch.cat(parts)
    n = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, n - p.shape[1]), value=fill) if p.dim() == 2 else p for p in parts])


@torch.no_grad()
def run_eval(model, loader, accelerator, recipe: Recipe, names: list[str]) -> dict[str, float]:
    """Loss and metrics over the whole loader, gathered over processes (duplicates dropped).
    Side tuners with several outputs report ``{key}.{metric}`` per output (and one summed loss)."""
    task = TASKS.get(recipe.task.type)
    model.eval()
    preds: dict[str, list] = {}
    labels_all: dict[str, list] = {}
    loss_sum, count = 0.0, 0
    for batch in loader:
        out = forward_batch(model, batch, accelerator.device)
        outs = out if isinstance(out, Mapping) else {"": out}
        gathered_outs, gathered_labels = {}, {}
        for key, o in outs.items():
            lab = batch["labels"][key] if isinstance(batch["labels"], Mapping) else batch["labels"]
            if task.pad_outputs is not None:  # sequence outputs: processes may hold different lengths
                o = accelerator.pad_across_processes(o.float(), dim=1, pad_index=task.pad_outputs)
            if task.pad_labels is not None:
                lab = accelerator.pad_across_processes(lab, dim=1, pad_index=task.pad_labels)
            o, lab = accelerator.gather_for_metrics((o.float(), lab))
            gathered_outs[key], gathered_labels[key] = o, lab
            p, t = predictions(recipe.task.type, o, lab)
            preds.setdefault(key, []).append(p.cpu())
            labels_all.setdefault(key, []).append(t.cpu())
        n = len(next(iter(gathered_labels.values())))
        single = gathered_outs.get("")
        loss = compute_loss(recipe.task.type, single if single is not None else gathered_outs,
                            gathered_labels[""] if single is not None else gathered_labels)
        loss_sum, count = loss_sum + loss.item() * n, count + n
    result = {"loss": loss_sum / max(count, 1)}
    label_names = getattr(getattr(loader, "dataset", None), "label_names", None)
    for key in preds:
        p, t = concat_padded(preds[key], 0), concat_padded(labels_all[key], IGNORE_INDEX)
        values = compute_metrics(names, p, t, label_names=label_names)
        result.update({(f"{key}.{k}" if key else k): float(v) for k, v in values.items()})
    model.train()
    return result


def evaluate(recipe: Recipe | None, checkpoint: str | Path, *, data: Dataset | None = None) -> dict[str, float]:
    """Metrics of a saved tuner on the recipe's eval split. ``recipe=None`` uses the recipe stored
    with the checkpoint; a recipe that builds a different model, or data with another number of
    classes, fails before evaluating, naming what differs."""
    _, meta = ckpt.read_checkpoint(checkpoint)
    recipe = recipe or meta["recipe"]
    accelerator = make_accelerator(recipe)
    check_task(recipe.task.type)
    model, (dataset,) = model_and_data(recipe, [recipe.data.eval_split], data=None if data is None else [data],
                                       num_classes=meta.get("num_classes"), description=meta.get("data") or None)
    ckpt.check_classes(meta, dataset)
    ckpt.load_into(model, checkpoint, recipe)
    names = metric_names(recipe, dataset)
    if recipe.train.cache_features:
        (dataset,), _ = cached(recipe, model, [dataset], accelerator)
    loader = make_loader(recipe, dataset, batch_size=recipe.eval.batch_size, shuffle=False)
    model, loader = accelerator.prepare(model, loader)
    return run_eval(model, loader, accelerator, recipe, names)
