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


class DataError(ConfigError):
    """Data that cannot be trained on as it is: a bad row, label, encoding or file (names the file
    and line). A ``ConfigError``: the command line exits with 2, before any training."""


class RunError(UtuningError):
    """A run folder that cannot be used as asked (owned by another run, locked, not writable), or a
    checkpoint that cannot be resumed."""


class DivergedError(UtuningError):
    """Training produced a non-finite loss or gradient; nothing non-finite was saved."""


class InterruptedRun(UtuningError):
    """SIGINT/SIGTERM stopped training after a final checkpoint; ``exit_code`` is 130 or 143."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.replace("-", "_").split("_") if part)


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The closest valid names to ``name`` (for "did you mean" messages). A choice that abbreviates
    ``name`` by its initials (``lr`` for ``learning_rate``) or the reverse ranks first."""
    choices = [str(c) for c in choices]
    name = str(name)
    abbreviations = [c for c in choices if "_" in name and c == _initials(name) or "_" in c and name == _initials(c)]
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        found = difflib.get_close_matches(name, choices, n=n, cutoff=0.0)
    return (abbreviations + [c for c in found if c not in abbreviations])[:n]
