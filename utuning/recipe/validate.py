"""Validation of recipe values the types cannot check: registry names, tuner arguments (names and
types), ranges. Every failure is a ``ConfigError`` naming the file (or override) that set the key,
the key, the value and the closest valid choice."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utuning.errors import ConfigError, UnknownNameError, closest
from utuning.registry import BACKBONES, COMPOSITIONS, TUNERS
from utuning.schema import Recipe
from utuning.tasks import TASKS

PRECISIONS = ("no", "fp16", "bf16")
NONFINITE = ("stop", "skip")
def validate(recipe: Recipe, source: str = "<recipe>", origins: Mapping[str, str] | None = None) -> None:
    """Check values the types cannot: registry names, tuner arguments, ranges. Raises ``ConfigError``."""
    origins = origins or {}

    def fail(key: str, msg: str) -> ConfigError:
        where = origins.get(key) or next((origins[k] for k in origins if key.startswith(k + ".")), source)
        return ConfigError(f"{where}: {key}: {msg}")

    def pick(key: str, value: str, choices: Sequence[str], what: str) -> None:
        if value not in choices:
            raise fail(key, f"unknown {what} {value!r}. Did you mean {closest(str(value), choices)}? Known: {sorted(choices)}")

    pick("backbone.name", recipe.backbone.name, list(BACKBONES), "backbone")
    pretrained = recipe.backbone.pretrained
    if not isinstance(pretrained, (bool, str)):
        raise fail("backbone.pretrained", f"must be false, true or a local checkpoint path, got {pretrained!r}")
    if isinstance(pretrained, str) and not Path(pretrained).expanduser().exists():
        raise fail("backbone.pretrained", f"checkpoint {pretrained!r} does not exist (give a file or folder, or true for hub weights)")
    for key, value in (("backbone.num_classes", recipe.backbone.num_classes), ("backbone.img_size", recipe.backbone.img_size)):
        if value is not None and value < 1:
            raise fail(key, f"must be >= 1 (or null), got {value}")
    for i, t in enumerate(recipe.tuners):
        _validate_tuner(t, f"tuners.{i}", fail)
    import utuning.data  # noqa: F401  (data sets register the tasks they define, e.g. causal_lm)

    pick("task.type", recipe.task.type, list(TASKS), "task type")
    pick("train.nonfinite", recipe.train.nonfinite, NONFINITE, "choice")
    pick("train.cache_dtype", recipe.train.cache_dtype, ("float16", "bfloat16", "float32"), "storage dtype")
    from utuning.engine.tracking import known_trackers

    for i, name in enumerate(recipe.output.trackers):
        pick(f"output.trackers.{i}", name, known_trackers(), "tracker")
    for name in recipe.output.tracker_args:
        if name not in recipe.output.trackers:
            raise fail(f"output.tracker_args.{name}", f"arguments for tracker {name!r}, which output.trackers "
                       f"does not list ({list(recipe.output.trackers)})")
    pick("train.precision", recipe.train.precision, PRECISIONS, "precision")
    checks = [
        ("optim.lr", recipe.optim.lr, 0, False), ("optim.weight_decay", recipe.optim.weight_decay, 0, True),
        ("optim.momentum", recipe.optim.momentum, 0, True), ("task.label_smoothing", recipe.task.label_smoothing, 0, True),
        ("schedule.warmup_epochs", recipe.schedule.warmup_epochs, 0, True),
        ("schedule.warmup_lr", recipe.schedule.warmup_lr, 0, True), ("schedule.min_lr", recipe.schedule.min_lr, 0, True),
        ("train.epochs", recipe.train.epochs, 1, True), ("train.batch_size", recipe.train.batch_size, 1, True),
        ("train.grad_accum", recipe.train.grad_accum, 1, True), ("train.log_every", recipe.train.log_every, 1, True),
        ("eval.batch_size", recipe.eval.batch_size, 1, True), ("eval.every", recipe.eval.every, 1, True),
        ("data.num_workers", recipe.data.num_workers, 0, True), ("train.max_nonfinite", recipe.train.max_nonfinite, 1, True),
    ]
    for key, n in (("train.steps", recipe.train.steps), ("train.checkpoint_every", recipe.train.checkpoint_every),
                   ("optim.max_grad_norm", recipe.optim.max_grad_norm)):
        if n is not None:
            checks.append((key, n, 0, False))
    for key, value, low, inclusive in checks:
        if value < low or (not inclusive and value == low):
            raise fail(key, f"must be {'>=' if inclusive else '>'} {low}, got {value}")
    if recipe.train.ema is not None and not 0 < recipe.train.ema < 1:
        raise fail("train.ema", f"EMA decay must be in (0, 1), got {recipe.train.ema}")
    if not 0 <= recipe.task.label_smoothing < 1:
        raise fail("task.label_smoothing", f"must be in [0, 1), got {recipe.task.label_smoothing}")
    from utuning.data import DATASETS

    pick("data.name", recipe.data.name, list(DATASETS), "dataset")
    known = _keyword_args(DATASETS.get(recipe.data.name), skip=("split", "backbone", "root"))
    for arg in recipe.data.args if known is not None else ():
        if arg not in known:
            raise fail(f"data.args.{arg}", f"dataset {recipe.data.name!r} has no argument {arg!r}. "
                       f"Did you mean {closest(str(arg), known)}? Arguments: {sorted(known)}")


def _validate_tuner(t: Any, key: str, fail) -> None:
    from utuning.model import expand_specs

    names = sorted(set(TUNERS) | set(COMPOSITIONS))
    if t.name not in names:
        raise fail(f"{key}.name", f"unknown tuner {t.name!r}. Did you mean {closest(t.name, names)}? Known tuners and compositions: {names}")
    at = t.at if isinstance(t.at, str) else list(t.at) if isinstance(t.at, Sequence) else None
    if not at or (isinstance(at, list) and not all(isinstance(a, str) for a in at)):
        raise fail(f"{key}.at", f"must be a site pattern or a list of them (e.g. 'blocks.*.attn'), got {t.at!r}")
    try:
        for spec in expand_specs([{"name": t.name, "at": at, "args": dict(t.args), "key": t.key}]):
            TUNERS.get(spec.name).check_args(spec.args)
            _check_arg_types(TUNERS.get(spec.name), spec.args, f"{key}.args", fail)
    except TypeError as e:  # a composition called with an argument it does not take
        raise fail(f"{key}.args", f"composition {t.name!r}: {e}") from e
    except (UnknownNameError, ConfigError) as e:
        raise fail(f"{key}.args", str(e)) from e


def _check_arg_types(cls: Any, args: Mapping[str, Any], key: str, fail) -> None:
    """A tuner argument whose default is a bool, int, float or str must get a value of that kind
    (an int where a float is expected is fine): ``rank: four`` fails here, naming the key."""
    defaults = cls.hyperparameters()
    for name, value in args.items():
        default = defaults.get(name, inspect.Parameter.empty)
        if default is inspect.Parameter.empty or default is None or value is None:
            continue
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
        if kinds is None:
            continue
        if not isinstance(value, kinds) or (isinstance(value, bool) and type(default) is not bool):
            raise fail(f"{key}.{name}", f"tuner {cls.name!r} expects {type(default).__name__} (default "
                       f"{default!r}), got {type(value).__name__} {value!r}")


def _keyword_args(fn: Any, skip: Sequence[str]) -> list[str] | None:
    """Keyword-only parameters of ``fn`` (None if it takes ``**kwargs``, so any name goes)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip]


