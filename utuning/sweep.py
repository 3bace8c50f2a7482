"""``utuning sweep``: run a sweep file (``utuning.sweep_file``) on Optuna.

Why Optuna (https://optuna.org) rather than Ray Tune: the unit of work here is a whole
``utuning train`` process, which accelerate may itself spread over GPUs, so the sweep needs a
shared study and a sampler, not a scheduler of its own; Optuna gives grid, TPE and random
samplers over one RDB storage (SQLite here; PostgreSQL or MySQL for many machines, each running
``utuning sweep SWEEP.yaml --worker``, e.g. as a SLURM array) without a cluster service to run.

Runs execute as ``utuning train RECIPE KEY=VALUE ... --resume`` (``utuning.cli.main``) in child
processes, at most ``jobs`` at a time (``gpus``: one GPU per job slot): forked from a server
that imported utuning once (``launcher: fork``) or a fresh ``python -m utuning.sweep`` each
(``launcher: process``); no engine internals are imported here. Each run has its own folder
(``<out>/search/<method>/<data>/<params>/s<seed>`` or ``<out>/final/<method>/<data>/s<seed>``)
holding ``sweep.json`` (what it is) and, once finished, ``summary.json``: a finished run is never
redone, an interrupted one continues from its last checkpoint, and a file lock held by the
training process keeps two workers from running the same folder. Trials left running by a
killed sweep are retried (locally at once, by other workers after Optuna's heartbeat grace period).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import queue
import random
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from utuning.errors import ConfigError, UtuningError
from utuning.sweep_file import GRACE_S, HEARTBEAT_S, LAUNCHERS, Method, Sweep, grid_size, load_sweep, plan

__all__ = ["RunFailed", "Runner", "Sweep", "load_sweep", "plan", "run_sweep", "search", "train_child"]

class RunFailed(UtuningError):
    """A ``utuning train`` subprocess exited with an error (its log is named)."""


# One run ---------------------------------------------------------------------------------------
def _slug(params: Mapping[str, Any]) -> str:
    if not params:
        return "default"
    text = "_".join(f"{k.split('.')[-1]}{v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}{v}"
                    for k, v in sorted(params.items()))
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)[:80] + "-" + digest


def _metric(summary: Mapping[str, Any], metric: str | None, value: str) -> float:
    from utuning.report import _primary

    metrics = summary.get("final_eval") if value == "final" else (summary.get("best_eval") or {}).get("metrics")
    metrics = metrics or {}
    name = metric or _primary(metrics)
    if name not in metrics:
        raise ConfigError(f"Run {summary.get('output_dir')!r} has no metric {name!r}; it has {sorted(metrics)}")
    return float(metrics[name])


def train_child(folder: str, log: str, argv: Sequence[str]) -> int:
    """Every run's process: take the folder's lock (held until the run ends, even if the sweep that
    started it is killed), skip a run another process finished meanwhile, else ``utuning train``."""
    with open(Path(folder) / ".sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = Path(folder) / "summary.json"
        if done.is_file() and json.loads(done.read_text()).get("status", "finished") != "interrupted":
            return 0
        with open(log, "ab") as out:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
        from utuning import cli

        return cli.main(["train", *argv])


def _forked(folder: str, log: str, argv: Sequence[str], device: str | None) -> None:
    if device is not None:  # before anything initialises CUDA in this child
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    sys.exit(train_child(folder, log, argv))


class Runner:
    """Launches the runs, at most ``jobs`` at once. ``launcher="fork"``: children of a fork server
    that imported utuning once (a run starts in milliseconds, not seconds); ``"process"``: a fresh
    ``python -m utuning.sweep`` interpreter per run. ``gpus``: slot i of ``jobs`` runs its runs
    with ``CUDA_VISIBLE_DEVICES=gpus[i % len(gpus)]``."""

    def __init__(self, sweep: Sweep, jobs: int, launcher: str = "fork", gpus: Sequence[str] = ()) -> None:
        if launcher not in LAUNCHERS:
            raise ConfigError(f"launcher={launcher!r} is not one of {list(LAUNCHERS)}")
        self.sweep = sweep
        self.launcher = launcher
        self.slots: queue.Queue = queue.Queue()
        for i in range(max(1, jobs)):
            self.slots.put(str(gpus[i % len(gpus)]) if gpus else None)
        self.failed: list[str] = []
        self._context = None

    def _start(self, folder: Path, argv: list[str], device: str | None) -> int:
        log = str(folder / "sweep.log")
        if self.launcher == "process":
            command = [sys.executable, "-m", "utuning.sweep", str(folder), log, *argv]
            env = None if device is None else {**os.environ, "CUDA_VISIBLE_DEVICES": device}
            return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env).returncode
        import multiprocessing

        if self._context is None:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(["utuning.cli", "utuning.engine"])
        process = self._context.Process(target=_forked, args=(str(folder), log, argv, device), daemon=False)
        process.start()
        process.join()
        return process.exitcode

    def run(self, method: Method, data: str | None, phase: str, params: Mapping[str, Any],
            seed: int) -> tuple[Path, dict]:
        """The run's folder and summary: read when the folder has one, else trained (or resumed) now."""
        s = self.sweep
        folder = s.out / phase / method.name / str(data or "-") / (_slug(params) if phase == "search" else "") / f"s{seed}"
        extra = s.search["overrides"] if phase == "search" else s.final_overrides
        overrides = [*s.overrides, *method.overrides, *extra, *(f"{k}={json.dumps(v)}" for k, v in params.items()),
                     f"train.seed={seed}", f"output.dir={folder.resolve()}"]
        recipe = method.recipe.replace("{data}", str(data))
        identity = {"sweep": s.name, "method": method.name, "data": data, "phase": phase, "params": dict(params),
                    "seed": seed, "recipe": recipe, "overrides": overrides}
        summary, code = self._finished(folder, identity), 0
        if summary is None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "sweep.json").write_text(json.dumps(identity, indent=2))
            plugins = [arg for item in s.imports for arg in ("--import", item)]
            device = self.slots.get()  # waits for a free slot
            try:
                code = self._start(folder, [recipe, *overrides, "--resume", *plugins, *(["--tiny"] if s.tiny else [])],
                                   device)
            finally:
                self.slots.put(device)
            summary = self._finished(folder, identity)
        status = None if summary is None else summary.get("status", "finished")
        if status != "finished":  # a diverged run is a result too: it is not run again
            self.failed.append(str(folder))
            raise RunFailed(f"utuning train {'ended ' + status if status else f'failed (exit {code})'} for "
                            f"{method.name} on {data} ({phase}, seed {seed}); log: {folder / 'sweep.log'}")
        return folder, summary

    @staticmethod
    def _finished(folder: Path, identity: Mapping[str, Any]) -> dict | None:
        """The summary of a run that ended (finished or diverged); None if it has to run or resume."""
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else None
        if summary is None or summary.get("status") == "interrupted":
            return None
        before = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").is_file() else {}
        if before and before.get("overrides") != identity["overrides"]:
            raise ConfigError(f"Run folder {str(folder)!r} finished with other settings ({before.get('overrides')}) "
                              f"than this sweep asks for ({identity['overrides']}); move it away to rerun it")
        return summary


# Search (Optuna) ------------------------------------------------------------------------------
def _storage(url: str, worker: bool):
    import optuna

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    heartbeat = {}
    if worker:
        argument, callback = _retry_callback()
        heartbeat = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S, argument: callback}
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(6):  # workers starting together on a new database race to create its tables
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **heartbeat)
            if url.startswith("sqlite"):
                _immediate_transactions(storage.engine)
            return storage
        except (OperationalError, IntegrityError):
            if attempt == 5:
                raise
            time.sleep(0.5 * (attempt + 1))


def _immediate_transactions(engine: Any) -> None:
    """SQLite ignores ``SELECT ... FOR UPDATE`` and pysqlite starts transactions lazily, so two
    threads can both read a WAITING trial and both take it (Optuna then fails to record the second
    result). Every transaction takes the write lock first (``BEGIN IMMEDIATE``, SQLAlchemy's
    recipe for pysqlite), which makes Optuna's read-then-update atomic; PostgreSQL and MySQL lock rows."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy, not the driver, begins transactions

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed are not reused


def _retry_callback() -> tuple[str, Any]:
    """The storage argument and Optuna's callback that enqueues a stale trial again (same
    parameters, same grid point); Optuna 4.9 renamed it."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
            return "heartbeat_stale_trial_callback", optuna.storages.RetryHeartbeatStaleTrialCallback()
        return "failed_trial_callback", optuna.storages.RetryFailedTrialCallback()


def _sampler(search: Mapping[str, Any], space: Mapping[str, Any]):
    import optuna

    if search["sampler"] == "grid":
        return optuna.samplers.GridSampler({k: list(v) for k, v in space.items()}, seed=search["sampler_seed"])
    if search["sampler"] == "tpe":
        return optuna.samplers.TPESampler(seed=search["sampler_seed"])
    return optuna.samplers.RandomSampler(seed=search["sampler_seed"])


def _suggest(trial: Any, key: str, values: Any) -> Any:
    if isinstance(values, list):
        return trial.suggest_categorical(key, values)
    if values.get("int"):
        return trial.suggest_int(key, int(values["low"]), int(values["high"]), log=bool(values.get("log")))
    return trial.suggest_float(key, float(values["low"]), float(values["high"]), log=bool(values.get("log")))


def _retry_stale(study: Any) -> None:
    """A sweep killed mid-trial leaves it RUNNING: fail it and enqueue it again (Optuna's retry callback)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        _retry_callback()[1](study, study._storage.get_trial(trial._trial_id))


def search(sweep: Sweep, runner: Runner, method: Method, data: str | None, *, jobs: int, worker: bool) -> dict:
    """Run (or resume) the study of one method and data set; the best trial's params and value."""
    import optuna
    from optuna.trial import TrialState

    s = sweep.search
    space = method.space or s["space"]
    study = optuna.create_study(study_name=f"{sweep.name}/{method.name}/{data or '-'}", direction=s["direction"],
                                storage=_storage(sweep.storage, worker), sampler=_sampler(s, space), load_if_exists=True)
    if study.direction.name.lower() != s["direction"]:
        raise ConfigError(f"The stored study {study.study_name!r} ({sweep.storage}) was made to "
                          f"{study.direction.name.lower()}, the sweep file now says {s['direction']}; use a new name or out")
    if not worker:
        _retry_stale(study)
    target = grid_size(space) if s["sampler"] == "grid" else s["trials"]

    def objective(trial: Any) -> float:
        params = {key: _suggest(trial, key, values) for key, values in space.items()}
        values = [_metric(runner.run(method, data, "search", params, seed)[1], s["metric"], s["value"])
                  for seed in sweep.seeds[: s["seeds"]]]
        return sum(values) / len(values)

    def done() -> int:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if s["sampler"] == "grid":  # grid points, not trials: a point may have run twice
            return len({tuple(sorted(t.params.items())) for t in complete})
        return len(complete)

    left = target - done()
    while left > 0:
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        study.optimize(objective, n_trials=left + waiting, n_jobs=max(1, jobs), catch=(RunFailed,),
                       callbacks=[optuna.study.MaxTrialsCallback(target, states=(TrialState.COMPLETE,))])
        failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        if done() == target - left and failed:  # no progress: the remaining trials fail
            break
        left = target - done()
    while worker and study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        with warnings.catch_warnings():  # other workers' trials: wait for them (or for their heartbeat to stop)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        time.sleep(2)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RunFailed(f"No trial of {method.name} on {data} finished; see the logs under {sweep.out / 'search'}")
    best = study.best_trial
    return {"params": dict(best.params), "value": best.value, "trials": done()}


# The sweep --------------------------------------------------------------------------------------
def run_sweep(sweep: Sweep, *, jobs: int = 1, worker: bool = False, gpus: Sequence[str] = ()) -> dict[str, Any]:
    """Search (if any), then the final runs of every method and data set over the seeds; writes
    ``<out>/selection.json`` and the paper tables ``<out>/table.md`` / ``table.csv``."""
    from utuning.report import aggregate, format_csv, format_markdown, paper_tables, read_run

    runner = Runner(sweep, jobs, sweep.launcher, gpus)
    sweep.out.mkdir(parents=True, exist_ok=True)

    def pipeline(pair: tuple[Method, str | None]) -> tuple[str, list[Path]]:
        method, data = pair
        chosen = search(sweep, runner, method, data, jobs=jobs, worker=worker) if sweep.search else {"params": {}}
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(sweep.seeds)))) as pool:
            futures = [pool.submit(runner.run, method, data, "final", chosen["params"], seed) for seed in sweep.seeds]
        finals = []
        for future in futures:
            try:
                finals.append(future.result()[0])
            except RunFailed:  # listed in runner.failed; the other seeds still count
                pass
        return json.dumps({"method": method.name, "data": data, **chosen}), finals

    pairs = list(itertools.product(sweep.methods, sweep.data))
    if worker:  # workers started together spread over the studies instead of queueing on the first one
        random.Random(os.getpid()).shuffle(pairs)
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(pairs)))) as pool:
        futures = [pool.submit(pipeline, p) for p in pairs]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except UtuningError as e:
                errors.append(str(e))
    selection = [json.loads(r[0]) for r in results]
    (sweep.out / "selection.json").write_text(json.dumps(selection, indent=2))
    runs = [read_run(p) for _, finals in results for p in finals]
    tables = paper_tables(aggregate(runs)) if runs else []
    (sweep.out / "table.md").write_text(format_markdown(tables) if tables else "")
    (sweep.out / "table.csv").write_text(format_csv(tables))
    return {"selection": selection, "tables": tables, "errors": errors + [f"failed: {f}" for f in runner.failed]}


if __name__ == "__main__":  # the "process" launcher: python -m utuning.sweep FOLDER LOG RECIPE KEY=VALUE ...
    sys.exit(train_child(sys.argv[1], sys.argv[2], sys.argv[3:]))
