"""The training loop: ``train(recipe)``.

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

Guarantees (docs/reliability.md): the run folder is owned by one run (``utuning.engine.run``);
a non-finite loss or gradient stops the run at once (``train.nonfinite: stop``, the default) or
skips the update (``skip``, stopping after ``train.max_nonfinite`` in a row), never saving
non-finite weights; SIGINT/SIGTERM finish the current step, write a checkpoint and raise
``InterruptedRun`` (exit 130/143), and ``--resume`` continues to the same final metrics.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from utuning import checkpoint as ckpt
from utuning.build import model_and_data
from utuning.data.checks import data_description
from utuning.engine import tracking
from utuning.engine.cached import check_cacheable, forward_batch
from utuning.engine.ema import TunerEMA
from utuning.engine.evaluate import cached, make_accelerator, make_loader, metric_names, run_eval
from utuning.engine.log import MetricsLog, PeakMemory, format_summary, progress
from utuning.engine.optim import build_optimizer, build_scheduler
from utuning.engine.run import RunFolder
from utuning.engine.state import better, rng_state, set_rng_state
from utuning.errors import DivergedError, InterruptedRun, RunError
from utuning.files import atomic_text
from utuning.model import unwrap
from utuning.recipe.io import recipe_to_dict
from utuning.schema import Recipe
from utuning.tasks import check_task, compute_loss

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """While active, SIGINT/SIGTERM set ``received`` instead of killing the process, so the loop can
    finish the current step and save; a second signal raises ``KeyboardInterrupt`` at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        try:
            self._old = {s: signal.signal(s, self._handle) for s in SIGNAL_EXIT}
        except ValueError:  # not the main thread: signals stay as they are
            self._old = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _grads_finite(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all())


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
          data: tuple[Dataset, Dataset] | None = None, on_update: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``recipe``'s tuners; returns the summary (also written to ``<out>/summary.json``).

    ``data``: (train, eval) datasets to use instead of ``utuning.data.build_dataset``. Items are
    ``{"inputs": {forward kwargs}, "labels": tensor}``. ``resume``: continue from the last intact
    checkpoint of ``output.dir``; ``overwrite``: replace the run already there. ``on_update(step)``
    is called after every optimizer update (tests, progress hooks).
    """
    from accelerate.utils import gather_object, set_seed

    t = recipe.train
    check_task(recipe.task.type)
    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    out = Path(recipe.output.dir)
    folder = RunFolder(out)
    set_seed(t.seed)

    # Everything that can fail on input is checked before the folder is touched.
    model, (train_ds, eval_ds) = model_and_data(recipe, [recipe.data.train_split, recipe.data.eval_split],
                                                data=None if data is None else list(data))
    num_classes = recipe.backbone.num_classes or getattr(train_ds, "num_classes", None)
    description = data_description(train_ds)
    names = metric_names(recipe, eval_ds)
    build_scheduler(build_optimizer(model, recipe.optim), recipe.schedule, total_updates=1, updates_per_epoch=1)
    if t.cache_features:
        check_cacheable(model, [train_ds, eval_ds], t)
    resume_from, notes, refused = None, [], None
    if main:
        extra = ((Path(t.cache_dir).expanduser(), "train.cache_dir"),) if t.cache_features else ()
        try:
            resume_from, notes = folder.claim(recipe, resume=resume, overwrite=overwrite, extra_writable=extra)
        except RunError as e:
            refused = e
    if accelerator.num_processes > 1:  # every process learns the main one's decision (or its refusal)
        shared = gather_object([(str(resume_from or ""), str(refused) if refused else None)])[0]
        resume_from, refused = Path(shared[0]) if shared[0] else None, refused or (RunError(shared[1]) if shared[1] else None)
    if refused is not None:
        raise refused
    try:
        return _train(recipe, accelerator, model, train_ds, eval_ds, names, num_classes, description, folder,
                      resume_from, notes, on_update)
    finally:
        folder.release()


def _train(recipe, accelerator, model, train_ds, eval_ds, names, num_classes, description, folder, resume_from,
           notes, on_update) -> dict[str, Any]:
    from accelerate.utils import gather_object

    t = recipe.train
    task = recipe.task.type
    main = accelerator.is_main_process
    out, checkpoints = folder.out, folder.checkpoints
    peak = PeakMemory()
    for note in notes:
        accelerator.print(note)
    feature_cache = None
    if t.cache_features:  # checks the model and data first, then builds or reuses the entries
        (train_ds, eval_ds), feature_cache = cached(recipe, model, [train_ds, eval_ds], accelerator)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    train_loader = make_loader(recipe, train_ds, batch_size=t.batch_size, shuffle=True)
    eval_loader = make_loader(recipe, eval_ds, batch_size=recipe.eval.batch_size, shuffle=False)
    updates_per_epoch = max(1, math.ceil(len(train_loader) / t.grad_accum))
    total_updates = t.steps if t.steps is not None else t.epochs * updates_per_epoch
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.schedule, total_updates=total_updates, updates_per_epoch=updates_per_epoch)
    ema = TunerEMA(model, t.ema) if t.ema is not None else None
    tunable, total = model.num_parameters()
    tuners = model.tuner_config()

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best": None, "last_eval": None, "train_time_s": 0.0,
                             "skipped": 0}
    saved: dict[str, Any] = {}
    if resume_from is not None:
        _, meta = ckpt.read_checkpoint(resume_from)
        ckpt.check_compatible(model, recipe, meta)
        saved = ckpt.load_train_state(resume_from)
        model.load_tuner_state_dict(saved["tuner"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state.update({k: saved[k] for k in state if k in saved})
    if main:
        accelerator.print(model.format_summary())
        if resume_from is not None:
            accelerator.print(f"resuming from {resume_from} (update {state['step']})")
    trackers = None
    if recipe.output.trackers:
        tracking.prepare_environment(list(recipe.output.trackers), recipe.output.tracking_uri)
        accelerator.init_trackers(recipe.name, config=tracking.flat(recipe_to_dict(recipe)),
                                  init_kwargs={k: dict(v) for k, v in recipe.output.tracker_args.items()})
        trackers = accelerator
    log = MetricsLog(out, tensorboard=recipe.output.tensorboard, trackers=trackers,
                     resume_step=state["step"] if resume_from is not None else None) if main else None

    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    tuned = unwrap(accelerator.unwrap_model(model))
    params = tuned.trainable_parameters()
    if resume_from is not None:
        if saved.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        rng = ckpt.load_rng(resume_from, accelerator.process_index)
        if rng is not None:
            set_rng_state(rng)
    if scheduler is not None:
        scheduler.step_update(state["step"])
    last_saved = str(resume_from) if resume_from is not None else None

    def save(best: bool = False) -> None:
        nonlocal last_saved
        rngs = gather_object([rng_state()])
        if main:
            raw = tuned.tuner_state_dict()
            evaluated = raw
            if ema is not None:
                with ema.applied(tuned):
                    evaluated = tuned.tuner_state_dict()
            train_state = {**state, "tuner": raw, "optimizer": optimizer.state_dict(),
                           "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                           "ema": ema.state_dict() if ema is not None else None}
            last_saved = str(ckpt.save_checkpoint(
                checkpoints, step=state["step"], tuner_state=evaluated, recipe=recipe, num_classes=num_classes,
                tuners=tuners, data=description, train_state=train_state, rng_states=rngs, best=best))
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

    def summary(status: str, **extra: Any) -> dict[str, Any]:
        data = {
            "name": recipe.name, "status": status, "output_dir": str(out), "tuners": tuners,
            "tunable_params": tunable, "total_params": total, "tunable_share": tunable / max(total, 1),
            "steps": state["step"],
            # Epochs trained, fractional when ``train.steps`` ended the run inside an epoch.
            "epochs": state["epoch"] + (round(state["batch"] / len(train_loader), 4) if state["batch"] else 0),
            "best_eval": state["best"], "final_eval": (state["last_eval"] or {}).get("metrics"),
            "train_time_s": state["train_time_s"], "peak_memory_mb": peak.mb(), "peak_memory_scope": peak.scope,
            "num_processes": accelerator.num_processes, "precision": t.precision, "device": str(accelerator.device),
            "skipped_updates": state["skipped"], **extra,
        }
        if feature_cache is not None:
            data["feature_cache"] = feature_cache
        if main:
            if log is not None:
                log.close()
            atomic_text(out / "summary.json", json.dumps(data, indent=2))
        return data

    def diverged(what: str) -> DivergedError:
        where = last_saved or "none (no checkpoint was written before it)"
        summary("diverged", diverged_at_step=state["step"] + 1, diverged_reason=what)
        return DivergedError(f"Training diverged at update {state['step'] + 1}: {what}. Nothing non-finite was saved; "
                             f"the last good checkpoint is {where}. Lower optim.lr (now {recipe.optim.lr}), set "
                             "optim.max_grad_norm, or use train.nonfinite: skip")

    started = time.perf_counter() - state["train_time_s"]
    bar = progress(total_updates, state["step"], main)
    model.train()
    in_a_row = 0
    with StopSignals() as signals:
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
                    bad = None if torch.isfinite(loss.detach()).all() else f"the loss is {loss.item()}"
                    if bad is None:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and recipe.optim.max_grad_norm:
                            accelerator.clip_grad_norm_(params, recipe.optim.max_grad_norm)
                        # fp16 AMP: the grad scaler skips non-finite steps itself and lowers its scale.
                        if accelerator.sync_gradients and accelerator.scaler is None and not _grads_finite(params):
                            bad = "a gradient is not finite"
                    if bad is not None:
                        optimizer.zero_grad(set_to_none=True)
                        in_a_row += 1
                        state["skipped"] += 1
                        if t.nonfinite == "stop" or in_a_row >= t.max_nonfinite:
                            bar.close()
                            raise diverged(bad if t.nonfinite == "stop" else f"{bad} ({in_a_row} updates in a row)")
                        accelerator.print(f"update {state['step'] + 1}: {bad}; skipped ({in_a_row} in a row)")
                    else:
                        in_a_row = 0
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
                if on_update is not None:
                    on_update(state["step"])
                if state["step"] % t.log_every == 0 or state["step"] == total_updates:
                    value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                    bar.set_postfix(loss=f"{value:.4f}")
                    if log is not None:
                        log.log("train", state["step"], {"loss": value, "lr": lr}, epoch=epoch)
                stop = _stop_requested(signals, accelerator)
                if state["step"] >= total_updates or stop:
                    # ``train.steps`` or a signal can end a run inside an epoch: the checkpoint then keeps the
                    # epoch and batch, so resuming goes on with that epoch's remaining batches.
                    stopped_mid_epoch = not accelerator.gradient_state.end_of_dataloader
                    break
                if t.checkpoint_every and state["step"] % t.checkpoint_every == 0 and not accelerator.gradient_state.end_of_dataloader:
                    state["train_time_s"] = time.perf_counter() - started
                    save()
            if not stopped_mid_epoch:
                state["epoch"], state["batch"] = epoch + 1, 0
            stop = _stop_requested(signals, accelerator)
            if stop and state["step"] < total_updates:
                state["train_time_s"] = time.perf_counter() - started
                save()
                bar.close()
                summary("interrupted")
                code = SIGNAL_EXIT.get(signals.received, 130)
                raise InterruptedRun(f"stopped by {signal.Signals(signals.received or signal.SIGINT).name} at update "
                                     f"{state['step']}; checkpoint {last_saved}; continue with --resume", code)
            done = state["step"] >= total_updates
            is_best = evaluate_now() if done or (epoch + 1) % recipe.eval.every == 0 else False
            if done or t.checkpoint_every is None or state["step"] % t.checkpoint_every == 0 or is_best:
                state["train_time_s"] = time.perf_counter() - started
                save(best=is_best)
    bar.close()
    state["train_time_s"] = time.perf_counter() - started
    result = summary("finished")
    if main:
        accelerator.print(format_summary(result))
    accelerator.wait_for_everyone()
    return result


def _stop_requested(signals: StopSignals, accelerator) -> bool:
    """Whether any process received SIGINT/SIGTERM (all processes stop at the same update)."""
    flag = signals.received is not None
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item())
