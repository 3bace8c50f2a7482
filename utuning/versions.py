"""Version knowledge in one place: the library releases the re-written layers were tested with, and
the check every backbone adapter runs at wrap time so that a library whose internals changed is
refused by name, with the reason, instead of computing something else.

The adapters re-write a family's blocks against that library's attribute names (timm's
``Attention.qkv``/``q_norm``, transformers' ``BertSelfAttention.query``...). A release that renames
or removes one of them would otherwise fail deep inside a forward pass, or worse, silently skip a
new submodule. ``require`` names every missing attribute, the installed version and the tested
range. The equivalence tests (tests/test_vision_tuners.py, tests/test_text_backbones.py and the
other families' tests) compare the re-written forward with the library's own on every supported
family, so a release that keeps the names but changes the computation fails CI there.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata
from typing import Any

from utuning.errors import UnsupportedModelError

#: Releases the adapters were tested with (the lock file pins these; .ci/latest tries newer ones).
TESTED = {"timm": "1.0.31", "transformers": "5.24.0", "torch": "2.14.1", "peft": "0.21.2"}


def installed(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "not installed"


def require(obj: Any, names: Iterable[str], *, where: str, library: str) -> None:
    """Raise ``UnsupportedModelError`` naming every attribute of ``names`` that ``obj`` lacks."""
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise UnsupportedModelError(
            f"{where} ({type(obj).__name__}) has no attribute(s) {missing}, which utuning's re-written forward reads. "
            f"Installed {library} {installed(library)}; utuning was tested with {library} {TESTED.get(library, '?')} "
            f"(see requirements/lock.txt). Install the tested release, or report the change"
        )
