"""``utuning sweep SWEEP.yaml``: methods x data sets x seeds x a hyperparameter search, on Optuna.

A PETL paper's table is a sweep: for each method and data set, hyperparameters are chosen on a
validation split (VTAB-1k: train on ``train800``, evaluate on ``val200``), the chosen ones are
retrained on train+val and evaluated on test with N seeds, and the table reports mean ± std.
The selection protocol is data (a YAML file)::

    name: vtab_adapters                       # default: the file's stem
    out: runs/sweeps/vtab_adapters            # default: runs/sweeps/<name>
    storage: null                             # Optuna storage; default sqlite:///<out>/optuna.db
    methods:                                  # method -> recipe (relative to this file; {data} is replaced)
      lora: ../recipes/vtab/{data}/lora.yaml
      vpt_deep: {recipe: ../recipes/vtab/{data}/vpt_deep.yaml, space: {optim.lr: [0.25, 1.25, 5.0]}}
    data: [dtd, kitti]                        # values of {data} (omit when recipes have none)
    seeds: [0, 1, 2]                          # final runs, one per seed (train.seed)
    overrides: [data.root=/data/vtab-1k]      # KEY=VALUE for every run
    tiny: false                               # every run with --tiny
    search:                                   # omit: the final runs only, with the recipes' values
      sampler: grid                           # grid | tpe | random
      trials: 20                              # tpe / random: completed trials per method and data set
      space: {optim.lr: [0.001, 0.003], optim.weight_decay: {low: 1.0e-5, high: 1.0e-2, log: true}}
      seeds: 1                                # the first N seeds evaluate each trial (their mean)
      overrides: [data.train_split=train800, data.eval_split=val200]
      metric: null                            # default: the run's main metric
      value: final                            # final | best evaluation of each run
      direction: maximize
    final:
      overrides: [data.train_split=train800val200, data.eval_split=test]

Why Optuna (https://optuna.org) rather than Ray Tune: the unit of work here is a whole
``utuning train`` process, which accelerate may itself spread over GPUs, so the sweep needs a
shared study and a sampler, not a scheduler of its own; Optuna gives grid, TPE and random
samplers over one RDB storage (SQLite here; PostgreSQL or MySQL for many machines, each running
``utuning sweep SWEEP.yaml --worker``, e.g. as a SLURM array) without a cluster service to run.

Runs execute as ``utuning train`` subprocesses (``python -m utuning.cli train RECIPE KEY=VALUE
... --resume``), at most ``jobs`` at a time. Each run has its own folder
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
import math
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utuning.errors import ConfigError, UtuningError, closest

TOP_KEYS = ("name", "out", "storage", "methods", "data", "seeds", "overrides", "tiny", "search", "final", "launcher",
            "imports")
SEARCH_KEYS = ("sampler", "trials", "space", "seeds", "overrides", "metric", "value", "direction", "sampler_seed")
METHOD_KEYS = ("recipe", "overrides", "space")
SAMPLERS = ("grid", "tpe", "random")
LAUNCHERS = ("fork", "process")
HEARTBEAT_S, GRACE_S = 60, 180  # a worker silent for GRACE_S seconds has its trial retried by the others


class RunFailed(UtuningError):
    """A ``utuning train`` subprocess exited with an error (its log is named)."""


@dataclass
class Method:
    name: str
    recipe: str  # path template, {data} replaced
    overrides: list[str] = field(default_factory=list)
    space: dict[str, Any] | None = None  # replaces the sweep's search space


@dataclass
class Sweep:
    name: str
    out: Path
    storage: str
    methods: list[Method]
    data: list[str | None]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    tiny: bool = False
    search: dict[str, Any] | None = None  # normalised SEARCH_KEYS
    final_overrides: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)  # plugins every run imports (``utuning train --import``)
    launcher: str = "fork"  # "fork": runs forked from a server that imported utuning once; "process": a fresh interpreter each


def _check_keys(node: Any, known: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where} must be a mapping of {list(known)}, got {node!r}")
    for key in node:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}. Did you mean {closest(str(key), known)}? Known: {list(known)}")
    return dict(node)


def _choice(value: Any, choices: Sequence[str], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}; did you mean {closest(str(value), choices)}?")
    return str(value)


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where} must be a list of KEY=VALUE overrides, got {value!r}")
    return list(value)


def _check_space(space: Any, sampler: str, where: str) -> dict[str, Any]:
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{where} must map recipe keys (e.g. optim.lr) to values, got {space!r}")
    for key, values in space.items():
        if isinstance(values, list) and values:
            continue
        if sampler != "grid" and isinstance(values, Mapping) and {"low", "high"} <= set(values) <= {"low", "high", "log", "int"}:
            continue
        raise ConfigError(f"{where}.{key}: give a list of values" + ("" if sampler == "grid" else
                          " or a range {low, high, log: bool, int: bool}") + f" (sampler {sampler!r}), got {values!r}")
    return dict(space)


def load_sweep(path: str | Path, *, overrides: Sequence[str] = (), imports: Sequence[str] = ()) -> Sweep:
    """Read and check a sweep file; ``overrides`` and ``imports`` (plugins, as ``--import``) are
    added to every run's. The file's ``imports`` are relative to it, the arguments to the current folder."""
    from utuning.plugins import resolve

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Sweep file {str(path)!r} does not exist")
    raw = _check_keys(yaml.safe_load(path.read_text()) or {}, TOP_KEYS, str(path))
    name = str(raw.get("name") or path.stem)
    search = None
    if raw.get("search") is not None:
        s = _check_keys(raw["search"], SEARCH_KEYS, f"{path}: search")
        sampler = _choice(s.get("sampler", "grid"), SAMPLERS, f"{path}: search.sampler")
        search = {"sampler": sampler, "trials": int(s.get("trials", 20)), "space": _check_space(
                  s.get("space"), sampler, f"{path}: search.space"), "seeds": int(s.get("seeds", 1)),
                  "overrides": _strings(s.get("overrides"), f"{path}: search.overrides"),
                  "metric": s.get("metric"), "value": s.get("value", "final"),
                  "direction": s.get("direction", "maximize"), "sampler_seed": int(s.get("sampler_seed", 0))}
        if search["value"] not in ("final", "best") or search["direction"] not in ("maximize", "minimize"):
            raise ConfigError(f"{path}: search.value must be final|best and search.direction maximize|minimize")
    methods = []
    if not isinstance(raw.get("methods"), Mapping) or not raw["methods"]:
        raise ConfigError(f"{path}: methods must map method names to recipe files, e.g. lora: recipes/x/lora.yaml")
    for m, entry in raw["methods"].items():
        entry = {"recipe": entry} if isinstance(entry, str) else _check_keys(entry, METHOD_KEYS, f"{path}: methods.{m}")
        if not isinstance(entry.get("recipe"), str):
            raise ConfigError(f"{path}: methods.{m}.recipe must be a recipe file path")
        space = entry.get("space")
        if space is not None and search is None:
            raise ConfigError(f"{path}: methods.{m}.space needs a search section (sampler, selection splits)")
        methods.append(Method(str(m), str((path.parent / entry["recipe"]).resolve()) if not Path(entry["recipe"]).is_absolute()
                              else entry["recipe"], _strings(entry.get("overrides"), f"{path}: methods.{m}.overrides"),
                              None if space is None else _check_space(space, search["sampler"], f"{path}: methods.{m}.space")))
    data = raw.get("data") or [None]
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if search is not None and not 1 <= search["seeds"] <= len(seeds):
        raise ConfigError(f"{path}: search.seeds={search['seeds']} must be between 1 and the {len(seeds)} seeds")
    for m in methods:
        for d in data:
            recipe = m.recipe.replace("{data}", str(d))
            if (d is None) != ("{data}" not in m.recipe) or not Path(recipe).is_file():
                raise ConfigError(f"{path}: methods.{m.name}: recipe {recipe!r} does not exist" +
                                  (" (use {data} in the path to vary the data set)" if d is not None else ""))
    out = Path(raw.get("out") or Path("runs") / "sweeps" / name)
    final = _check_keys(raw.get("final") or {}, ("overrides",), f"{path}: final")
    return Sweep(name=name, out=out, storage=str(raw.get("storage") or f"sqlite:///{(out / 'optuna.db').resolve()}"),
                 methods=methods, data=list(data), seeds=list(seeds),
                 overrides=_strings(raw.get("overrides"), f"{path}: overrides") + list(overrides),
                 tiny=bool(raw.get("tiny", False)), search=search,
                 final_overrides=_strings(final.get("overrides"), f"{path}: final.overrides"),
                 launcher=_choice(raw.get("launcher", "fork"), LAUNCHERS, f"{path}: launcher"),
                 imports=[resolve(i, path.parent.resolve()) for i in raw.get("imports") or []]
                 + [resolve(i, None) for i in imports])


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
    import os

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


def _forked(folder: str, log: str, argv: Sequence[str]) -> None:
    sys.exit(train_child(folder, log, argv))


class Runner:
    """Launches the runs, at most ``jobs`` at once. ``launcher="fork"``: children of a fork server
    that imported utuning once (a run starts in milliseconds, not seconds); ``"process"``: a fresh
    ``python -m utuning.sweep`` interpreter per run."""

    def __init__(self, sweep: Sweep, jobs: int, launcher: str = "fork") -> None:
        if launcher not in LAUNCHERS:
            raise ConfigError(f"launcher={launcher!r} is not one of {list(LAUNCHERS)}")
        self.sweep = sweep
        self.launcher = launcher
        self.slots = threading.BoundedSemaphore(max(1, jobs))
        self.failed: list[str] = []
        self._context = None

    def _start(self, folder: Path, argv: list[str]) -> int:
        log = str(folder / "sweep.log")
        if self.launcher == "process":
            command = [sys.executable, "-m", "utuning.sweep", str(folder), log, *argv]
            return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        import multiprocessing

        if self._context is None:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(["utuning.cli", "utuning.engine"])
        process = self._context.Process(target=_forked, args=(str(folder), log, argv), daemon=False)
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
            with self.slots:
                plugins = [arg for item in s.imports for arg in ("--import", item)]
                code = self._start(folder, [recipe, *overrides, "--resume", *plugins, *(["--tiny"] if s.tiny else [])])
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **heartbeat)


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


def _grid_size(space: Mapping[str, Any]) -> int:
    return math.prod(len(v) for v in space.values())


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
    if not worker:
        _retry_stale(study)
    target = _grid_size(space) if s["sampler"] == "grid" else s["trials"]

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
        optuna.storages.fail_stale_trials(study)  # other workers' trials: wait for them (or their heartbeat)
        time.sleep(10)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RunFailed(f"No trial of {method.name} on {data} finished; see the logs under {sweep.out / 'search'}")
    best = study.best_trial
    return {"params": dict(best.params), "value": best.value, "trials": done()}


# The sweep --------------------------------------------------------------------------------------
def run_sweep(sweep: Sweep, *, jobs: int = 1, worker: bool = False) -> dict[str, Any]:
    """Search (if any), then the final runs of every method and data set over the seeds; writes
    ``<out>/selection.json`` and the paper tables ``<out>/table.md`` / ``table.csv``."""
    from utuning.report import aggregate, format_csv, format_markdown, paper_tables, read_run

    runner = Runner(sweep, jobs, sweep.launcher)
    sweep.out.mkdir(parents=True, exist_ok=True)

    def pipeline(pair: tuple[Method, str | None]) -> tuple[str, list[Path]]:
        method, data = pair
        chosen = search(sweep, runner, method, data, jobs=jobs, worker=worker) if sweep.search else {"params": {}}
        finals = [runner.run(method, data, "final", chosen["params"], seed)[0] for seed in sweep.seeds]
        return json.dumps({"method": method.name, "data": data, **chosen}), finals

    pairs = list(itertools.product(sweep.methods, sweep.data))
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


def plan(sweep: Sweep) -> str:
    """What ``run_sweep`` will run (``utuning sweep --dry-run``): studies, trials and runs."""
    lines, total = [f"sweep {sweep.name!r}: out {sweep.out}, storage {sweep.storage}"], 0
    for method, data in itertools.product(sweep.methods, sweep.data):
        recipe = method.recipe.replace("{data}", str(data))
        line = f"{method.name} on {data or '-'} ({recipe}): "
        if sweep.search:
            space = method.space or sweep.search["space"]
            trials = _grid_size(space) if sweep.search["sampler"] == "grid" else sweep.search["trials"]
            total += trials * sweep.search["seeds"]
            line += (f"{sweep.search['sampler']} search over {sorted(space)}: {trials} trials x "
                     f"{sweep.search['seeds']} seed(s) with {sweep.search['overrides']}, then ")
        total += len(sweep.seeds)
        lines.append(line + f"{len(sweep.seeds)} final runs (seeds {sweep.seeds}) with {sweep.final_overrides}")
    return "\n".join(lines + [f"{total} runs in all (finished ones are not run again)"])


if __name__ == "__main__":  # the "process" launcher: python -m utuning.sweep FOLDER LOG RECIPE KEY=VALUE ...
    sys.exit(train_child(sys.argv[1], sys.argv[2], sys.argv[3:]))
