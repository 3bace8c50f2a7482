"""One small exception hierarchy: every user-facing failure of utuning is a ``UtuningError``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UtuningError(Exception):
    """Base class of every error utuning raises on purpose."""


class UnknownNameError(UtuningError, KeyError):
    """A registry, site or option name that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SiteError(UtuningError):
    """A site pattern matches nothing, or a site cannot host what was asked."""


class PlacementError(UtuningError):
    """A tuner's placement is not offered by the site it was put on."""


class UnsupportedModelError(UtuningError):
    """A model (or one of its blocks) that a backbone adapter cannot reproduce exactly."""


class StateDictError(UtuningError):
    """A tuner state dict with missing, unexpected or mis-shaped entries."""


class ConfigError(UtuningError):
    """A bad argument, recipe key or value."""


class CacheError(UtuningError):
    """A feature cache that cannot be used as asked."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The closest valid names to ``name`` (for "did you mean" messages)."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        found = difflib.get_close_matches(name, choices, n=n, cutoff=0.0)
    return found
