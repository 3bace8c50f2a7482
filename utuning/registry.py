"""Registries: the one place a tuner, backbone or composition name is defined."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Generic, TypeVar

from utuning.errors import ConfigError, UnknownNameError, closest

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, with helpful errors for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not name or name != name.lower() or not name.replace("_", "").isalnum():
            raise ConfigError(f"{self.kind} names are lower_snake_case, got {name!r}")

        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ConfigError(f"{self.kind} {name!r} is already registered by {self._entries[name]!r}")
            self._entries[name] = entry
            if isinstance(entry, type):
                entry.name = name  # type: ignore[attr-defined]
            return entry

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register temporary entries clean up with it)."""
        self._entries.pop(name, None)

    @contextmanager
    def registered(self, name: str, entry: T) -> Iterator[T]:
        """Register ``entry`` as ``name`` for the duration of a ``with`` block."""
        self.register(name)(entry)
        try:
            yield entry
        finally:
            self.unregister(name)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}. Did you mean {closest(name, self._entries)}? "
                f"Known {self.kind}s: {sorted(self._entries)}"
            )
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


TUNERS: Registry = Registry("tuner")
BACKBONES: Registry = Registry("backbone")
COMPOSITIONS: Registry = Registry("composition")


def register_tuner(name: str):
    """Class decorator: make a ``Tuner`` subclass available under ``name``."""
    return TUNERS.register(name)


def register_backbone(name: str):
    """Class decorator: make a ``Backbone`` subclass available under ``name``."""
    return BACKBONES.register(name)


def register_composition(name: str):
    """Function decorator: a named mix of tuners (e.g. Dual-U-Tuner) returning tuner specs."""
    return COMPOSITIONS.register(name)
