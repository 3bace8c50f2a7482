"""The one recipe serialiser: a ``Recipe`` to plain resolved data and YAML, and back.

A saved recipe (a run's ``recipe.yaml``, every checkpoint's ``recipe.yaml``, the recipe in a
checkpoint's metadata) is fully resolved: bases merged (``defaults`` emptied), interpolations
replaced, plugin imports as module names and absolute paths. It therefore loads from anywhere with
``utuning.recipe.load_recipe`` and rebuilds the same model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from utuning.errors import ConfigError
from utuning.files import atomic_text
from utuning.schema import Recipe


def recipe_to_dict(recipe: Recipe | DictConfig) -> dict[str, Any]:
    """The recipe as plain, resolved Python data; ``defaults`` kept as written."""
    cfg = recipe if isinstance(recipe, DictConfig) else OmegaConf.structured(recipe)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def recipe_from_dict(data: Mapping[str, Any], where: str = "recipe") -> Recipe:
    """A ``Recipe`` from plain data (e.g. a checkpoint's metadata); unknown keys and wrong types are
    ``ConfigError``s naming ``where`` and the key."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Recipe), dict(data)))  # type: ignore[return-value]
    except oc_errors.OmegaConfBaseException as e:
        from utuning.recipe.load import _translate

        raise _translate(e, where) from None


def recipe_yaml(recipe: Recipe | DictConfig) -> str:
    """Resolved YAML with bases merged (``defaults: []``) and a header naming the bases."""
    data = recipe_to_dict(recipe)
    extended = data.get("defaults") or []
    data["defaults"] = []
    header = f"# Resolved utuning recipe (bases already merged: {extended})\n" if extended else "# Resolved utuning recipe\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def save_recipe(recipe: Recipe | DictConfig, path: str | Path) -> Path:
    """Write ``recipe_yaml(recipe)`` to ``path`` atomically (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_text(path, recipe_yaml(recipe))


def read_saved(path: str | Path) -> dict[str, Any]:
    """A saved recipe file as plain data (no plugin import, no validation), for comparisons."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the saved recipe ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a saved recipe is a mapping, got {type(data).__name__}")
    return data


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain recipes."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        full = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, full + ".")
        elif a != b:
            out.append(full)
    return out
