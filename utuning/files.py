"""Files written safely: atomic replacement, per-file checksums, and nested state without pickle.

* ``atomic_write(path, write)``: ``write(tmp)`` fills a temporary sibling, ``os.replace`` moves it
  in place, so a reader sees the old file or the new one, never half of one.
* ``checksums(folder)`` / ``verify(folder)``: a ``checksums.json`` manifest (sha256 of every file)
  written last; ``verify`` names the first missing, truncated or altered file.
* ``save_tree(obj, folder, stem)`` / ``load_tree(folder, stem)``: nested Python state (dicts,
  lists, tuples, numbers, strings, tensors, numpy arrays) as ``stem.safetensors`` (the tensors)
  plus ``stem.json`` (the structure). Loading it never runs code, unlike ``torch.load`` of a
  pickle: a run folder from someone else is data, not a program.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utuning.errors import StateDictError

CHECKSUMS = "checksums.json"


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` through a temporary sibling and ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before it replaces the old file (a crash keeps one of them)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_folder(path: str | Path, write: Callable[[Path], Any]) -> Any:
    """``write(tmp)`` fills a temporary empty sibling folder of ``path``, whose files are synced and
    which is then renamed to ``path`` (absent, or an empty folder); on any error the temporary is
    removed and ``path`` untouched. Returns what ``write`` returned."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = write(tmp)
        for file in (p for p in tmp.rglob("*") if p.is_file()):
            with open(file, "rb+") as f:  # on disk before the rename makes the folder visible
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def atomic_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: str | Path) -> dict[str, str]:
    """sha256 and size of every file in ``folder`` (not recursive) into ``checksums.json``."""
    folder = Path(folder)
    sums = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    atomic_text(folder / CHECKSUMS, json.dumps(sums, indent=1))
    return sums


def verify(folder: str | Path, names: list[str] | None = None) -> None:
    """Raise ``StateDictError`` naming the file when a listed file is missing, truncated or altered.
    ``names``: check only these (default: every file the manifest lists)."""
    folder = Path(folder)
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        raise StateDictError(f"{manifest} is missing: the checkpoint was not completely written (or predates "
                             "checksums); it cannot be trusted")
    try:
        sums = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateDictError(f"{manifest} is corrupt ({e})") from None
    for name in names if names is not None else list(sums):
        path = folder / name
        if name not in sums:
            raise StateDictError(f"{path} is not listed in {manifest}; it cannot be verified")
        if not path.is_file():
            raise StateDictError(f"{path} is missing (listed in {manifest})")
        size = path.stat().st_size
        if size != sums[name]["bytes"]:
            raise StateDictError(f"{path} is truncated or altered: {size} bytes, the checkpoint wrote "
                                 f"{sums[name]['bytes']}")
        if sha256(path) != sums[name]["sha256"]:
            raise StateDictError(f"{path} is corrupt: its sha256 differs from the one written with it")


# Nested state without pickle -----------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} without pickle: {obj!r:.80}")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(obj: Any, folder: str | Path, stem: str) -> list[Path]:
    """``obj`` as ``folder/stem.safetensors`` + ``folder/stem.json``; returns both paths."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, tensors)
    st, js = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    atomic_write(st, lambda p: save_file(tensors, str(p)))
    atomic_text(js, json.dumps(skeleton))
    return [st, js]


def load_tree(folder: str | Path, stem: str) -> Any:
    """What ``save_tree`` wrote; a missing or unreadable file is a ``StateDictError`` naming it."""
    folder = Path(folder)
    st, js = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    for path in (st, js):
        if not path.is_file():
            raise StateDictError(f"{path} is missing")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError) as e:
        raise StateDictError(f"{st} cannot be read ({e})") from None
    try:
        skeleton = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateDictError(f"{js} cannot be read ({e})") from None
    return _decode(skeleton, tensors)
