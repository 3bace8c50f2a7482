"""The sweep file of ``utuning sweep``: methods x data sets x seeds x a hyperparameter search.

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
    imports: [./my_tuners.py]                 # plugins every run imports (utuning train --import), relative to this file
    launcher: fork                            # fork: runs forked from a server that imported utuning once
                                              # (no interpreter start per run); process: a fresh python each
    search:                                   # omit: the final runs only, with the recipes' values
      sampler: grid                           # grid | tpe | random
      trials: 20                              # tpe / random: completed trials per method and data set
      space: {optim.lr: [0.001, 0.003], optim.weight_decay: [1.0e-4, 1.0e-3]}   # recipe key -> values
                                              # tpe / random also take ranges: {low: 1.0e-5, high: 1.0e-2, log: true}
      seeds: 1                                # the first N seeds evaluate each trial (their mean)
      overrides: [data.train_split=train800, data.eval_split=val200]
      metric: null                            # default: the run's main metric
      value: final                            # final | best evaluation of each run
      direction: maximize
    final:
      overrides: [data.train_split=train800val200, data.eval_split=test]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utuning.errors import ConfigError, closest

TOP_KEYS = ("name", "out", "storage", "methods", "data", "seeds", "overrides", "tiny", "search", "final", "launcher",
            "imports")
SEARCH_KEYS = ("sampler", "trials", "space", "seeds", "overrides", "metric", "value", "direction", "sampler_seed")
METHOD_KEYS = ("recipe", "overrides", "space")
SAMPLERS = ("grid", "tpe", "random")
LAUNCHERS = ("fork", "process")
HEARTBEAT_S, GRACE_S = 60, 180  # a worker silent for GRACE_S seconds has its trial retried by the others


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


def grid_size(space: Mapping[str, Any]) -> int:
    return math.prod(len(v) for v in space.values())


def plan(sweep: Sweep) -> str:
    """What ``run_sweep`` will run (``utuning sweep --dry-run``): studies, trials and runs."""
    lines, total = [f"sweep {sweep.name!r}: out {sweep.out}, storage {sweep.storage}"], 0
    for method, data in itertools.product(sweep.methods, sweep.data):
        recipe = method.recipe.replace("{data}", str(data))
        line = f"{method.name} on {data or '-'} ({recipe}): "
        if sweep.search:
            space = method.space or sweep.search["space"]
            trials = grid_size(space) if sweep.search["sampler"] == "grid" else sweep.search["trials"]
            total += trials * sweep.search["seeds"]
            line += (f"{sweep.search['sampler']} search over {sorted(space)}: {trials} trials x "
                     f"{sweep.search['seeds']} seed(s) with {sweep.search['overrides']}, then ")
        total += len(sweep.seeds)
        lines.append(line + f"{len(sweep.seeds)} final runs (seeds {sweep.seeds}) with {sweep.final_overrides}")
    return "\n".join(lines + [f"{total} runs in all (finished ones are not run again)"])
