"""Frozen features computed once and stored on disk, for side tuners and the linear probe.

A side tuner (Y-Tuning, Res-Tuning-Bypass) or a linear probe trains on features of a backbone
that never changes, so they can be computed once and reused by later epochs and runs::

    cache = FeatureCache("~/.cache/utuning/features")
    train = cache.dataset(model, train_set, batch_size=64, device="cuda")   # builds or reuses
    loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=train.collate)
    for feats, target in loader:                     # feats: utuning.Features, target: collated labels
        loss = criterion(model.side_forward(feats.to(device)), target)

``dataset`` items are ``(inputs, target)`` pairs (``inputs`` a tensor passed positionally, or a
dict of tensors passed as keyword arguments to ``backbone.intermediates``), ``utuning.data``
items ``{"inputs": {...}, "labels": ...}``, or dicts whose target keys are
``labels``/``label``/``start_positions``/``end_positions``. An item of the
returned ``CachedFeatureDataset`` is ``(Features of one sample, target)``; its ``collate``
stacks them back into a ``Features`` batch (padding sequences of different lengths, mask False).

Entries live in ``root/<key>/``: safetensors shards of at most ``shard_size`` samples and about
``shard_mib`` MiB (so building holds a few shards' worth of features, whatever the data's size), ``manifest.json``
(shapes, dtypes, per-shard sha256, the fingerprint parts) and ``COMPLETE`` (the manifest's
sha256), each written to a temporary file and moved with ``os.replace``; ``COMPLETE`` last.
The key is a sha256 of: the backbone weights (every frozen tensor but the head's), the layers read, the data
(``dataset.fingerprint()`` if it exists, else a hash of every sample as the dataset returns it)
and the transform (``repr`` of ``dataset.transform``), so any change gives a new entry. An entry
that is partial (no ``COMPLETE``, a missing shard) or corrupt (checksum mismatch, unreadable) is
reported with a warning and rebuilt, never used.

Random augmentation (torchvision ``Random*``, ``RandAugment``, ``AutoAugment``,
``TrivialAugmentWide``, ``AugMix``, ``ColorJitter``, ``RandomErasing``, or ``dataset.augmented =
True``) would be frozen into the cache, so it is refused with a ``CacheError`` unless
``cache_augmented_views=True``: then ONE augmented view per sample is drawn with the random
generators seeded by ``view_seed`` (the same views on every run) and stored; every epoch sees
those fixed views.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from utuning.backbone import Features
from utuning.errors import CacheError, closest
from utuning.files import atomic_write, sha256
from utuning.fingerprint import random_augmentation, seeded, transform_repr, update_hash, weights_fingerprint
from utuning.tasks import IGNORE_INDEX

FORMAT = 1
TARGET_KEYS = ("labels", "label", "start_positions", "end_positions")


# Samples -----------------------------------------------------------------------------------
def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` from a collated batch: ``utuning.data``'s ``{"inputs": {...}, "labels": ...}``,
    a pair, or a dict with target keys."""
    if isinstance(batch, Mapping) and isinstance(batch.get("inputs"), Mapping):
        return batch["inputs"], batch.get("labels")
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        target = {k: v for k, v in batch.items() if k in TARGET_KEYS}
        return inputs, (next(iter(target.values())) if len(target) == 1 else target or None)
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise CacheError(f"Cannot split a batch of type {type(batch).__name__} into (inputs, target); "
                     "return (inputs, target) pairs or dicts with a 'labels' key")


def _flat_target(target: Any) -> dict[str, Tensor]:
    if target is None:
        return {}
    if isinstance(target, Mapping):
        return {f"target.{k}": torch.as_tensor(v) for k, v in target.items()}
    return {"target": torch.as_tensor(target)}




def _pad(t: Tensor, n: int, dim: int = 1, fill: float = 0) -> Tensor:
    """Pad ``t`` along ``dim`` to length ``n`` (features with 0, masks with False)."""
    if t.shape[dim] >= n:
        return t
    shape = list(t.shape)
    shape[dim] = n - t.shape[dim]
    return torch.cat([t, t.new_full(shape, fill)], dim=dim)


def _fill(key: str, t: Tensor) -> float:
    return IGNORE_INDEX if key.startswith("target") and not t.is_floating_point() else 0


def _pack(feats: Features, target: Any) -> dict[str, Tensor]:
    out = {f"layer.{i}": t for i, t in feats.layers.items()}
    out.update(final=feats.final, pooled=feats.pooled)
    if feats.mask is not None:
        out["mask"] = feats.mask.bool()
    out.update(_flat_target(target))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    out = {}
    for k in parts[0]:
        ts = [p[k] for p in parts]
        if ts[0].dim() >= 2 and len({t.shape[1] for t in ts}) > 1:
            n = max(t.shape[1] for t in ts)  # sequences of different lengths: pad, mask False
            ts = [_pad(t, n, 1, _fill(k, t)) for t in ts]
        out[k] = torch.cat(ts)
    return out


#: safetensors dtype names -> torch dtypes (what the cache writes).
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
#: ``train.cache_dtype`` values -> storage dtype (None keeps the backbone's).
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def storage_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The feature storage dtype named ``name`` (``float32``, ``float16``, ``bfloat16``; None: the
    backbone's own), for ``FeatureCache(dtype=...)``."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in STORAGE_DTYPES:
        raise CacheError(f"cache_dtype={name!r} is not one of {list(STORAGE_DTYPES)}; did you mean "
                         f"{closest(str(name), list(STORAGE_DTYPES))}?")
    return STORAGE_DTYPES[name]


class ShardReader:
    """Rows of one safetensors shard read with ``os.pread``: only the bytes of the asked rows
    enter the process (no memory map whose touched pages would count as resident memory)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        (size,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        header = json.loads(os.pread(self.fd, size, 8))
        header.pop("__metadata__", None)
        base = 8 + size
        self.tensors = {}  # name -> (dtype, row shape, row bytes, first byte)
        for name, info in header.items():
            dtype = ST_DTYPES[info["dtype"]]
            row = list(info["shape"][1:])
            nbytes = math.prod(row) * torch.empty((), dtype=dtype).element_size()
            self.tensors[name] = (dtype, row, nbytes, base + info["data_offsets"][0])

    def row(self, r: int) -> dict[str, Tensor]:
        out = {}
        for name, (dtype, shape, nbytes, start) in self.tensors.items():
            raw = bytearray(os.pread(self.fd, nbytes, start + r * nbytes)) if nbytes else bytearray()
            out[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
        return out

    def close(self) -> None:
        os.close(self.fd)


class CachedFeatureDataset(Dataset):
    """Items ``(Features of one sample, target)``; batch them with ``collate`` (``collate_fn``).

    Each item reads only its own rows from its shard (``ShardReader``), so resident memory stays
    bounded by the batches in flight, not by the cache's size; the files are opened lazily in
    each DataLoader worker. Features come back in the storage dtype (``FeatureCache(dtype=...)``);
    ``Features.to`` / the tuner's first layer casts them."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = Path(path), manifest
        self.key = manifest["key"]
        self.layers = list(manifest["layers"])
        self.extra = dict(manifest.get("extra", {}))
        self._offsets = np.cumsum([0] + [s["count"] for s in manifest["shards"]])
        self._open: dict[int, ShardReader] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _shard(self, j: int) -> ShardReader:
        if j not in self._open:  # checksums were verified when the entry was opened
            self._open[j] = ShardReader(self.path / self.manifest["shards"][j]["file"])
        return self._open[j]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own files
        return {**self.__dict__, "_open": {}}

    def __del__(self) -> None:
        for reader in getattr(self, "_open", {}).values():
            reader.close()

    def __getitem__(self, index: int) -> tuple[Features, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached samples")
        index %= len(self)
        j = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = self._shard(j).row(int(index - self._offsets[j]))
        feats = Features({i: row[f"layer.{i}"] for i in self.layers}, row["final"], row["pooled"], row.get("mask"),
                         dict(self.extra))
        targets = {k.removeprefix("target."): v for k, v in row.items() if k.startswith("target.")}
        return feats, row["target"] if "target" in row else (targets or None)

    def collate(self, items: Sequence[tuple[Features, Any]]) -> tuple[Features, Any]:
        """Stack single-sample features into a ``Features`` batch (pad to the longest, mask False;
        per-token integer targets are padded with ``IGNORE_INDEX``)."""
        feats = [f for f, _ in items]
        n = max(f.final.shape[0] for f in feats)

        def stack(ts: list[Tensor], fill: float = 0) -> Tensor:  # (N, ...) each -> (B, N, ...)
            return _compute(torch.stack([_pad(t, n, 0, fill) for t in ts]))

        batch = Features({i: stack([f.layers[i] for f in feats]) for i in self.layers}, stack([f.final for f in feats]),
                         _compute(torch.stack([f.pooled for f in feats])),
                         None if feats[0].mask is None else stack([f.mask for f in feats]), dict(self.extra))
        return batch, _collate_targets([t for _, t in items])


def _store(key: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    """Features in the storage dtype; a value beyond its range (float16: 65504) is an error, not an inf."""
    if not t.is_floating_point() or key.startswith("target"):
        return t
    out = t.to(dtype)
    if not torch.isfinite(out).all() and torch.isfinite(t).all():
        raise CacheError(f"Cached features {key!r} reach {t.abs().max().item():.4g}, beyond {dtype}'s range; "
                         "store them as bfloat16 or float32 (cache_dtype)")
    return out


def _compute(t: Tensor) -> Tensor:
    """Half-precision storage back to float32 for the tuners (one batch at a time)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _collate_targets(targets: list[Any]) -> Any:
    if targets[0] is None:
        return None
    if isinstance(targets[0], Mapping):
        return {k: _collate_targets([t[k] for t in targets]) for k in targets[0]}
    if isinstance(targets[0], Tensor) and targets[0].dim() >= 1 and len({t.shape[0] for t in targets}) > 1:
        n = max(t.shape[0] for t in targets)
        return torch.stack([_pad(t, n, 0, _fill("target", t)) for t in targets])
    return default_collate(targets)


def feature_weights(backbone: Any) -> dict[str, Tensor]:
    """The frozen tensors the features depend on: all but the head sites' (a new head is random
    per seed and reads only ``pooled``, so it must not give every seed its own cache entry)."""
    specs = backbone.site_specs()
    head = {id(p) for name, spec in specs.items() if spec.kind == "head"
            for _, p in backbone.slot(name).handle.named_parameters()}
    params = dict(backbone.model.named_parameters(remove_duplicate=False))
    return {k: v for k, v in backbone.frozen_state_dict().items() if not (k in params and id(params[k]) in head)}


class FeatureCache:
    """Frozen features on disk under ``root``, one entry per fingerprint (see the module docs).

    ``shard_size``: at most this many samples per safetensors shard, and ``shard_mib``: about this
    many MiB per shard (building an entry holds about two shards in memory); ``dtype``: storage dtype of floating features
    (a torch dtype or ``"float32"``/``"float16"``/``"bfloat16"``, part of the key; float16 halves
    the disk use and the bytes read per epoch), None keeps the backbone's. Targets keep theirs.
    """

    def __init__(self, root: str | os.PathLike, *, shard_size: int = 1024, shard_mib: float = 64,
                 dtype: str | torch.dtype | None = None) -> None:
        if shard_size < 1 or shard_mib <= 0:
            raise CacheError(f"shard_size={shard_size!r} must be >= 1 and shard_mib={shard_mib!r} > 0")
        self.shard_mib = shard_mib
        self.root = Path(root).expanduser()
        self.shard_size, self.dtype = shard_size, storage_dtype(dtype)
        self.builds = 0  # entries built by this object (hits do not count)

    # Keys ---------------------------------------------------------------------------------
    def fingerprint(self, model: Any, dataset: Any, *, layers: Sequence[int] | None = None,
                    cache_augmented_views: bool = False, view_seed: int = 0) -> dict[str, Any]:
        """The parts the key hashes; refuses models whose features depend on trainable tuners and,
        unless ``cache_augmented_views``, datasets with random augmentation."""
        if not model.reads_features_only():
            specs = model.backbone.site_specs()
            inside = [a.key for a in model.attached() if a.handle is not None and specs[a.sites[0]].kind != "head"]
            raise CacheError(f"Tuners inside the backbone ({inside[:3]}) change its features during training, so "
                             "they cannot be cached; only side tuners and head tuners (linear probe) can use the cache")
        aug = random_augmentation(dataset)
        if aug and not cache_augmented_views:
            raise CacheError(
                f"Dataset {type(dataset).__name__} uses random augmentation ({aug}); caching would freeze one "
                "random view per sample. Remove it for cached training, or pass cache_augmented_views=True to "
                "cache fixed augmented views"
            )
        parts = {
            "format": FORMAT,
            "backbone": f"{type(model.backbone).__name__}:{weights_fingerprint(feature_weights(model.backbone))}",
            "backbone_options": model.backbone.feature_options(),
            "layers": sorted(model.side_layers if layers is None else {int(i) for i in layers}),
            "transform": transform_repr(dataset),
            "dtype": str(self.dtype),
            "augmented_views": view_seed if aug else None,
        }
        fp = getattr(dataset, "fingerprint", None)
        if callable(fp):
            parts["data"] = f"fingerprint:{fp()}"
        else:
            h = hashlib.sha256()
            with seeded(view_seed) if aug else contextlib.nullcontext():
                for i in range(len(dataset)):
                    update_hash(h, dataset[i])
            parts["data"] = f"samples:{len(dataset)}:{h.hexdigest()}"
        return parts

    @staticmethod
    def key_of(parts: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    # Entries ------------------------------------------------------------------------------
    def dataset(self, model: Any, dataset: Any, *, batch_size: int = 64, collate_fn: Callable | None = None,
                device: str | torch.device = "cpu", layers: Sequence[int] | None = None,
                cache_augmented_views: bool = False, view_seed: int = 0) -> CachedFeatureDataset:
        """The cached features of ``dataset`` under ``model``'s frozen backbone: reused when a valid
        entry exists, (re)built otherwise. ``layers`` defaults to ``model.side_layers``."""
        parts = self.fingerprint(model, dataset, layers=layers, cache_augmented_views=cache_augmented_views,
                                 view_seed=view_seed)
        key = self.key_of(parts)
        path = self.root / key
        manifest = self._open(path)
        if manifest is None:
            manifest = self._build(model, dataset, parts, key, batch_size=batch_size, collate_fn=collate_fn,
                                   device=device)
        return CachedFeatureDataset(path, manifest)

    def _open(self, path: Path) -> dict[str, Any] | None:
        """The manifest of a complete, intact entry; None (with a warning) otherwise."""
        if not path.exists():
            return None
        try:
            raw = (path / "manifest.json").read_bytes()
            if not (path / "COMPLETE").is_file():
                raise CacheError("no COMPLETE marker (a build was interrupted)")
            if (path / "COMPLETE").read_text().strip() != hashlib.sha256(raw).hexdigest():
                raise CacheError("COMPLETE does not match manifest.json")
            manifest = json.loads(raw)
            for shard in manifest["shards"]:
                file = path / shard["file"]
                if not file.is_file():
                    raise CacheError(f"shard {shard['file']} is missing")
                if sha256(file) != shard["sha256"]:
                    raise CacheError(f"shard {shard['file']} fails its sha256 check")
            return manifest
        except (OSError, ValueError, KeyError, CacheError) as e:
            warnings.warn(f"Feature cache entry {str(path)!r} is unusable ({e}); rebuilding it", stacklevel=3)
            return None

    @torch.no_grad()
    def _build(self, model: Any, dataset: Any, parts: dict[str, Any], key: str, *, batch_size: int,
               collate_fn: Callable | None, device: str | torch.device) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}.tmp-"))
        backbone, was_training = model.backbone, model.backbone.training
        backbone.eval()  # features of the frozen model as it is evaluated (no dropout)
        shards: list[dict[str, Any]] = []
        pending: list[dict[str, Tensor]] = []
        extra: dict[str, Any] = {}
        try:
            collate = collate_fn or default_collate
            # A plain loop, not a DataLoader: a DataLoader draws from the global generator, which
            # would shift the seeded augmented views away from the ones the fingerprint hashed.
            loader = (collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
                      for i in range(0, len(dataset), batch_size))
            with seeded(int(parts["augmented_views"])) if parts["augmented_views"] is not None else contextlib.nullcontext():
                for batch in loader:
                    inputs, target = split_batch(batch)
                    inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, Mapping) \
                        else inputs.to(device)
                    feats = backbone.intermediates(**inputs, layers=parts["layers"]) if isinstance(inputs, Mapping) \
                        else backbone.intermediates(inputs, layers=parts["layers"])
                    # Scalar extras (e.g. prefix_tokens) go to the manifest; tensors in ``extra`` are not cached.
                    extra = {k: v for k, v in feats.extra.items() if isinstance(v, (bool, int, float, str))}
                    packed = _pack(feats, target)
                    if self.dtype is not None:
                        packed = {k: _store(k, v, self.dtype) for k, v in packed.items()}
                    pending.append(packed)
                    sample = sum(v[0].numel() * v.element_size() for v in packed.values() if len(v))  # bytes
                    rows = max(1, min(self.shard_size, int(self.shard_mib * 2**20 // max(sample, 1))))
                    while sum(len(p["pooled"]) for p in pending) >= rows:
                        pending = self._flush(tmp, shards, pending, rows)
            if pending:
                self._flush(tmp, shards, pending, None)
            manifest = {"format": FORMAT, "key": key, "fingerprint": parts, "layers": parts["layers"],
                        "extra": extra, "num_samples": sum(s["count"] for s in shards), "shards": shards}
            raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
            atomic_write(tmp / "manifest.json", lambda f: f.write_bytes(raw))
            atomic_write(tmp / "COMPLETE", lambda f: f.write_bytes(hashlib.sha256(raw).hexdigest().encode()))  # written last
            path = self.root / key
            if path.is_dir() and not path.is_symlink():  # the damaged entry this build replaces
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():  # a plain file (or link) where the entry belongs
                path.unlink()
            try:
                os.replace(tmp, path)
            except OSError:  # another process finished the same entry first: use it if it is intact
                if self._open(path) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            backbone.train(was_training)
        self.builds += 1
        return manifest

    @staticmethod
    def _flush(tmp: Path, shards: list[dict[str, Any]], pending: list[dict[str, Tensor]],
               size: int | None) -> list[dict[str, Tensor]]:
        """Write one shard of ``size`` samples (all pending if None); return what is left."""
        data = _concat(pending)
        n = len(data["pooled"]) if size is None else size
        head = {k: v[:n].contiguous() for k, v in data.items()}
        rest = {k: v[n:] for k, v in data.items()}
        name = f"shard-{len(shards):05d}.safetensors"
        fd, part = tempfile.mkstemp(dir=tmp, prefix=f".{name}.")
        os.close(fd)
        save_file(head, part)
        os.replace(part, tmp / name)
        shards.append({"file": name, "count": n, "sha256": sha256(tmp / name),
                       "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in head.items()}})
        return [rest] if len(rest["pooled"]) else []
