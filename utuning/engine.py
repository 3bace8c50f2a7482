"""The training engine: ``train(recipe)``, ``evaluate(recipe, checkpoint)``, ``build_model(recipe)``.

Built on 🤗 accelerate, with no device or distributed code of its own. The same recipe runs on
CPU, one GPU, several GPUs or several nodes::

    python -m utuning train recipe.yaml                                  # CPU or one GPU
    accelerate launch --num_processes 4 -m utuning train recipe.yaml     # DDP (or torchrun --nproc_per_node 4)
    accelerate launch --use_fsdp --fsdp_use_orig_params true -m utuning train recipe.yaml

DDP runs with ``find_unused_parameters=False``: only tuner parameters require gradients, so DDP
registers hooks on those alone. FSDP goes through accelerate's FSDP plugin; because frozen and
trainable parameters share modules it needs ``use_orig_params=True``.

``train.batch_size`` is the GLOBAL batch: accelerate splits each batch over the processes
(``split_batches=True``), so 1 and N processes see the same batches and give the same updates.
Data order is seeded per epoch (a seedable sampler), and ``resume`` skips the batches of the
interrupted epoch that were already trained, so a resumed run ends where an uninterrupted one does.
Run folder ``output.dir``: recipe.yaml, metrics.jsonl, tb/, summary.json, checkpoints/ (see
``utuning.checkpoint``).

``train.cache_features``: for models whose tuners only read frozen features (side tuners, a
linear probe), the features of the train and eval splits are computed once with
``utuning.cache.FeatureCache(train.cache_dir)`` (reused by later runs while backbone weights, data
and transforms are unchanged), and every epoch trains through ``model(features=...)``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from utuning import checkpoint as ckpt
from utuning import config
from utuning.backbone import build_backbone
from utuning.engine_parts import (
    MetricsLog,
    TunerEMA,
    basic_metrics,
    better,
    build_optimizer,
    build_scheduler,
    cached_datasets,
    check_task,
    compute_loss,
    concat_padded,
    default_metrics,
    format_summary,
    forward_batch,
    peak_memory_mb,
    predictions,
    progress,
    rng_state,
    set_rng_state,
)
from utuning.errors import ConfigError
from utuning.model import TunedModel, unwrap
from utuning.schema import Recipe


def build_model(recipe: Recipe, *, num_classes: int | None = None) -> TunedModel:
    """The backbone of ``recipe.backbone`` with ``recipe.tuners`` attached. ``num_classes`` (e.g.
    from the data) applies when the recipe leaves ``backbone.num_classes`` unset. Built under
    ``train.seed`` without touching the global RNG, so a randomly initialised backbone is rebuilt
    identically (e.g. by ``load_tuned``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        return config.build_model(recipe, num_classes=num_classes)


def model_and_data(recipe: Recipe, splits: list[str], *, data: list[Dataset] | None = None,
                   num_classes: int | None = None) -> tuple[TunedModel, list[Dataset]]:
    """The model and the datasets of ``splits`` (or the given ``data``). Datasets need a backbone
    (transforms, tokenizer) and the model needs their number of classes: when neither the recipe
    nor ``num_classes`` tells it, the data is built with a weightless copy of the backbone first."""
    known = recipe.backbone.num_classes or num_classes
    if data is not None:
        return build_model(recipe, num_classes=known or _num_classes(recipe, data[0])), list(data)
    if known is not None:
        model = build_model(recipe, num_classes=known)
        return model, build_datasets(recipe, splits, model.backbone)
    probe = build_backbone(recipe.backbone.name, **config.backbone_kwargs(recipe, pretrained=False))
    datasets = build_datasets(recipe, splits, probe)
    return build_model(recipe, num_classes=_num_classes(recipe, datasets[0])), datasets


def _num_classes(recipe: Recipe, dataset: Dataset) -> int | None:
    found = getattr(dataset, "num_classes", None)
    return 1 if found is None and recipe.task.type == "regression" else found


# Data ----------------------------------------------------------------------------------------
def build_datasets(recipe: Recipe, splits: list[str], backbone: Any) -> list[Dataset]:
    try:
        from utuning.data import build_dataset
    except ImportError as err:
        raise ConfigError(f"utuning.data is not available ({err}); pass datasets to train(..., data=...)") from None
    d = recipe.data
    return [build_dataset(d.name, split=s, backbone=backbone, root=d.root, **d.args) for s in splits]


def _collate(dataset: Dataset):
    """The dataset's own ``collate`` (it knows its pad id), else ``utuning.data.collate``."""
    found = getattr(dataset, "collate", None)
    if callable(found):
        return found
    try:
        from utuning.data import collate
    except ImportError:
        from torch.utils.data import default_collate as collate
    return collate


def _cached(recipe: Recipe, model: TunedModel, datasets: list[Dataset], accelerator) -> tuple[list[Dataset], dict]:
    """``train.cache_features``: the datasets as cached frozen features (see ``cached_datasets``)."""
    model.to(accelerator.device)
    return cached_datasets(model, datasets, [_collate(d) for d in datasets], recipe.train,
                           batch_size=recipe.eval.batch_size, device=accelerator.device,
                           main_process_first=accelerator.main_process_first)


def _loader(recipe: Recipe, dataset: Dataset, *, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_collate(dataset),
                      num_workers=recipe.data.num_workers, generator=torch.Generator().manual_seed(recipe.train.seed))


def _accelerator(recipe: Recipe):
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
    )


# Evaluation ----------------------------------------------------------------------------------
def _metric_names(recipe: Recipe, dataset: Dataset) -> list[str]:
    return list(recipe.eval.metrics or getattr(dataset, "metrics", None) or default_metrics(recipe.task.type))


@torch.no_grad()
def run_eval(model, loader, accelerator, recipe: Recipe, names: list[str]) -> dict[str, float]:
    """Loss and metrics over the whole loader, gathered over processes (duplicates dropped).
    Side tuners with several outputs report ``{key}.{metric}`` per output (and one summed loss)."""
    task = recipe.task.type
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
            if task == "labelling":  # different sequence lengths per process
                o = accelerator.pad_across_processes(o, dim=1)
                lab = accelerator.pad_across_processes(lab, dim=1, pad_index=-100)
            elif task == "qa":  # (B, N, 2) scores: padded positions never win the arg-max
                o = accelerator.pad_across_processes(o.float(), dim=1, pad_index=torch.finfo(torch.float32).min)
            o, lab = accelerator.gather_for_metrics((o.float(), lab))
            gathered_outs[key], gathered_labels[key] = o, lab
            p, t = predictions(task, o, lab)
            preds.setdefault(key, []).append(p.cpu())
            labels_all.setdefault(key, []).append(t.cpu())
        n = len(next(iter(gathered_labels.values())))
        single = gathered_outs.get("")
        loss = compute_loss(task, single if single is not None else gathered_outs,
                            gathered_labels[""] if single is not None else gathered_labels)
        loss_sum, count = loss_sum + loss.item() * n, count + n
    result = {"loss": loss_sum / max(count, 1)}
    label_names = getattr(getattr(loader, "dataset", None), "label_names", None)
    for key in preds:
        p, t = concat_padded(preds[key], 0), concat_padded(labels_all[key], -100)
        values = _metrics(task, names, p, t, label_names)
        result.update({(f"{key}.{k}" if key else k): v for k, v in values.items()})
    model.train()
    return result


def _metrics(task: str, names: list[str], preds: torch.Tensor, labels: torch.Tensor, label_names) -> dict[str, float]:
    try:
        from utuning.data import compute_metrics
    except ImportError:
        return basic_metrics(task, names, preds, labels)
    return {k: float(v) for k, v in compute_metrics(names, preds, labels, label_names=label_names).items()}


def evaluate(recipe: Recipe | None, checkpoint: str | Path, *, data: Dataset | None = None) -> dict[str, float]:
    """Metrics of a saved tuner on the recipe's eval split. ``recipe=None`` uses the recipe stored
    with the checkpoint; a recipe that builds a different model fails, naming what differs."""
    _, meta = ckpt.read_checkpoint(checkpoint)
    recipe = recipe or meta["recipe"]
    accelerator = _accelerator(recipe)
    check_task(recipe.task.type)
    model, (dataset,) = model_and_data(recipe, [recipe.data.eval_split], data=None if data is None else [data],
                                       num_classes=meta.get("num_classes"))
    ckpt.load_into(model, checkpoint, recipe)
    names = _metric_names(recipe, dataset)
    if recipe.train.cache_features:
        (dataset,), _ = _cached(recipe, model, [dataset], accelerator)
    loader = _loader(recipe, dataset, batch_size=recipe.eval.batch_size, shuffle=False)
    model, loader = accelerator.prepare(model, loader)
    return run_eval(model, loader, accelerator, recipe, names)


# Training ------------------------------------------------------------------------------------
def train(recipe: Recipe, *, resume: bool = False, data: tuple[Dataset, Dataset] | None = None) -> dict[str, Any]:
    """Train ``recipe``'s tuners; returns the summary (also written to ``<out>/summary.json``).

    ``data``: (train, eval) datasets to use instead of ``utuning.data.build_dataset``. Items are
    ``{"inputs": {forward kwargs}, "labels": tensor}``. ``resume``: continue from
    ``<out>/checkpoints/last`` (a fresh start when there is none).
    """
    from accelerate.utils import gather_object, set_seed

    t = recipe.train
    task = check_task(recipe.task.type)
    accelerator = _accelerator(recipe)
    main = accelerator.is_main_process
    out = Path(recipe.output.dir)
    checkpoints = out / "checkpoints"
    resume_from = ckpt.read_pointer(checkpoints) if resume else None
    set_seed(t.seed)

    model, (train_ds, eval_ds) = model_and_data(recipe, [recipe.data.train_split, recipe.data.eval_split],
                                                data=None if data is None else list(data))
    num_classes = recipe.backbone.num_classes or _num_classes(recipe, train_ds)
    names = _metric_names(recipe, eval_ds)
    feature_cache = None
    if t.cache_features:  # checks the model and data first, then builds or reuses the entries
        (train_ds, eval_ds), feature_cache = _cached(recipe, model, [train_ds, eval_ds], accelerator)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    train_loader = _loader(recipe, train_ds, batch_size=t.batch_size, shuffle=True)
    eval_loader = _loader(recipe, eval_ds, batch_size=recipe.eval.batch_size, shuffle=False)
    updates_per_epoch = max(1, math.ceil(len(train_loader) / t.grad_accum))
    total_updates = t.steps if t.steps is not None else t.epochs * updates_per_epoch
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.schedule, total_updates=total_updates, updates_per_epoch=updates_per_epoch)
    ema = TunerEMA(model, t.ema) if t.ema is not None else None
    tunable, total = model.num_parameters()

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best": None, "last_eval": None, "train_time_s": 0.0}
    if resume_from is not None:
        _, meta = ckpt.read_checkpoint(resume_from)
        ckpt.check_compatible(recipe, meta, str(resume_from))
        saved = ckpt.load_train_state(resume_from)
        model.load_tuner_state_dict(saved["tuner"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state.update({k: saved[k] for k in state})
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.save_recipe(recipe, out / "recipe.yaml")
        accelerator.print(model.format_summary())
        if resume_from is not None:
            accelerator.print(f"resuming from {resume_from} (update {state['step']})")
    log = MetricsLog(out, tensorboard=recipe.output.tensorboard,
                     resume_step=state["step"] if resume_from is not None else None) if main else None

    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    tuned = unwrap(accelerator.unwrap_model(model))
    if resume_from is not None:
        if saved.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        rng = ckpt.load_rng(resume_from, accelerator.process_index)
        if rng is not None:
            set_rng_state(rng)
    if scheduler is not None:
        scheduler.step_update(state["step"])

    def save(best: bool = False) -> None:
        rngs = gather_object([rng_state()])
        if main:
            raw = tuned.tuner_state_dict()
            evaluated = raw
            if ema is not None:
                with ema.applied(tuned):
                    evaluated = tuned.tuner_state_dict()
            train_state = {**state, "tuner": raw, "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict() if scheduler is not None else None,
                           "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                           "ema": ema.state_dict() if ema is not None else None}
            ckpt.save_checkpoint(checkpoints, step=state["step"], tuner_state=evaluated, recipe=recipe,
                                 num_classes=num_classes, train_state=train_state, rng_states=rngs, best=best)
        accelerator.wait_for_everyone()

    def evaluate_now() -> bool:
        if ema is not None:
            with ema.applied(tuned):
                metrics = run_eval(model, eval_loader, accelerator, recipe, names)
        else:
            metrics = run_eval(model, eval_loader, accelerator, recipe, names)
        state["last_eval"] = {"step": state["step"], "epoch": state["epoch"], "metrics": metrics}
        primary = next((k for k in metrics if k != "loss"), "loss")
        best = state["best"]
        is_best = better(primary.rsplit(".", 1)[-1], metrics[primary], None if best is None else best["metrics"][primary])
        if is_best:
            state["best"] = state["last_eval"]
        if log is not None:
            log.log("eval", state["step"], metrics, epoch=state["epoch"])
        return is_best

    started = time.perf_counter() - state["train_time_s"]
    bar = progress(total_updates, state["step"], main)
    model.train()
    while state["step"] < total_updates:
        epoch = state["epoch"]
        train_loader.set_epoch(epoch)
        loader = train_loader
        if state["batch"]:
            loader = accelerator.skip_first_batches(train_loader, state["batch"])
            loader.set_epoch(epoch)
        stopped_mid_epoch = False
        for batch in loader:
            with accelerator.accumulate(model):
                loss = compute_loss(task, forward_batch(model, batch, accelerator.device), batch["labels"],
                                    label_smoothing=recipe.task.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.optim.max_grad_norm:
                    accelerator.clip_grad_norm_(tuned.trainable_parameters(), recipe.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["batch"] += 1
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            lr = optimizer.param_groups[0]["lr"]  # the rate this update used
            if scheduler is not None:
                scheduler.step_update(state["step"])
            if ema is not None:
                ema.update(tuned)
            bar.update(1)
            if state["step"] % t.log_every == 0 or state["step"] == total_updates:
                value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                bar.set_postfix(loss=f"{value:.4f}")
                if log is not None:
                    log.log("train", state["step"], {"loss": value, "lr": lr}, epoch=epoch)
            if state["step"] >= total_updates:
                # ``train.steps`` can end a run inside an epoch: the checkpoint then keeps the epoch
                # and batch, so resuming with more steps goes on with that epoch's remaining batches.
                stopped_mid_epoch = not accelerator.gradient_state.end_of_dataloader
                break
            if t.checkpoint_every and state["step"] % t.checkpoint_every == 0 and not accelerator.gradient_state.end_of_dataloader:
                state["train_time_s"] = time.perf_counter() - started
                save()
        if not stopped_mid_epoch:
            state["epoch"], state["batch"] = epoch + 1, 0
        done = state["step"] >= total_updates
        is_best = evaluate_now() if done or (epoch + 1) % recipe.eval.every == 0 else False
        if done or t.checkpoint_every is None or state["step"] % t.checkpoint_every == 0 or is_best:
            state["train_time_s"] = time.perf_counter() - started
            save(best=is_best)
    bar.close()

    state["train_time_s"] = time.perf_counter() - started
    summary = {
        "name": recipe.name,
        "output_dir": str(out),
        "tuners": tuned.tuner_config(),
        "tunable_params": tunable,
        "total_params": total,
        "tunable_share": tunable / max(total, 1),
        "steps": state["step"],
        # Epochs trained, fractional when ``train.steps`` ended the run inside an epoch.
        "epochs": state["epoch"] + (round(state["batch"] / len(train_loader), 4) if state["batch"] else 0),
        "best_eval": state["best"],
        "final_eval": (state["last_eval"] or {}).get("metrics"),
        "train_time_s": state["train_time_s"],
        "peak_memory_mb": peak_memory_mb(),
        "num_processes": accelerator.num_processes,
        "precision": t.precision,
        "device": str(accelerator.device),
    }
    if feature_cache is not None:
        summary["feature_cache"] = feature_cache
    if main:
        log.close()
        ckpt._atomic(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
        accelerator.print(format_summary(summary))
    accelerator.wait_for_everyone()
    return summary
