"""Fingerprints for the feature cache: what makes two cached entries the same.

A cache key hashes the backbone's frozen weights, the data as the dataset returns it and the
dataset's transforms; random augmentation is detected so that it is never frozen into a cache
by accident, and ``seeded`` draws the same augmented views on every run when it is wanted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from utuning.errors import CacheError

AUGMENTATIONS = ("RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "ColorJitter", "RandomErasing",
                 "ElasticTransform", "GaussianNoise")


def update_hash(h: Any, value: Any) -> None:
    """Feed a sample (tensors, arrays, numbers, strings, images, containers) into a hash."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            update_hash(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            update_hash(h, v)
        h.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        h.update(repr(value).encode())
    elif hasattr(value, "tobytes") and hasattr(value, "size"):  # PIL images
        h.update(f"I{getattr(value, 'mode', '')}{value.size}".encode())
        h.update(value.tobytes())
    else:
        raise CacheError(
            f"Cannot fingerprint a dataset sample part of type {type(value).__name__}; give the dataset a "
            "fingerprint() method returning a string that changes whenever its data does"
        )


_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime_ns, ctime_ns) -> digest, this process only


def file_digest(path: str | os.PathLike) -> str:
    """blake2b (128 bits) of a file's bytes, streamed in 1 MiB blocks (~1 GB/s: a 100 MB study
    adds about 0.1 s to a start). Size and mtime alone miss an edit whose mtime was restored
    (``cp -p``, ``rsync -a``, ``tar``); within one process a file whose inode, size, mtime and
    ctime (which no copy tool can restore) are unchanged is not read twice."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def weights_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over every frozen tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        update_hash(h, state[name])
    return h.hexdigest()


def _chain(dataset: Any) -> Iterator[Any]:
    """The dataset and the datasets it wraps (``Subset.dataset`` ...)."""
    seen = 0
    while dataset is not None and seen < 16:
        yield dataset
        dataset, seen = getattr(dataset, "dataset", None), seen + 1


def transform_repr(dataset: Any) -> str:
    return " | ".join(repr(getattr(d, "transform", None)) for d in _chain(dataset))


def _transforms(t: Any, depth: int = 0) -> Iterator[Any]:
    if t is None or depth > 8:
        return
    yield t
    for attr in ("transforms", "transform"):
        inner = getattr(t, attr, None)
        if isinstance(inner, (list, tuple, torch.nn.ModuleList)):
            for x in inner:
                yield from _transforms(x, depth + 1)
        elif inner is not None and inner is not t:
            yield from _transforms(inner, depth + 1)


def random_augmentation(dataset: Any) -> str | None:
    """The name of the first random augmentation in the dataset's transforms, if any."""
    for d in _chain(dataset):
        if getattr(d, "augmented", False):
            return f"{type(d).__name__}.augmented=True"
        for t in _transforms(getattr(d, "transform", None)):
            name = type(t).__name__
            if name.startswith("Random") or name in AUGMENTATIONS:
                return name
    return None


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch, numpy and ``random`` inside, and restore their states after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
