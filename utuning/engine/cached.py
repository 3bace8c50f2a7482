"""``train.cache_features``: train side tuners and the linear probe on cached frozen features."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from utuning.backbone import Backbone
from utuning.cache import FeatureCache, random_augmentation
from utuning.engine.state import rng_state, set_rng_state
from utuning.errors import ConfigError
from utuning.model import TunedModel
from utuning.schema import TrainConfig


class FeatureBatches(Dataset):
    """A ``utuning.cache.CachedFeatureDataset`` in the engine's batch form: ``collate`` gives
    ``{"labels": target, "features": Features}`` (labels first: accelerate reads a batch size
    from the first tensor it finds). Samples keep the order of the source dataset, so a seeded
    sampler (and ``resume``) sees the same batches as without the cache."""

    def __init__(self, cached: Any, source: Dataset) -> None:
        self.cached = cached
        self.label_names = getattr(source, "label_names", None)
        self.num_classes = getattr(source, "num_classes", None)

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> Any:
        return self.cached[index]

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        features, target = self.cached.collate(items)
        return {"labels": target, "features": features}


def check_cacheable(model: TunedModel, datasets: Sequence[Dataset], train: TrainConfig) -> None:
    """``train.cache_features`` needs tuners that only read frozen features, and data without
    random augmentation unless ``train.cache_augmented_views``. Raises before anything is built."""
    if not model.reads_features_only():
        specs = model.backbone.site_specs()
        inside = [a.key for a in model.attached() if a.handle is not None and specs[a.sites[0]].kind != "head"]
        raise ConfigError(
            f"train.cache_features: true, but tuners {inside[:3]}{' ...' if len(inside) > 3 else ''} sit inside the "
            "backbone and change its features while training, so they cannot be cached. Only side tuners (e.g. "
            "ytuning, bypass) and head tuners (linear_probe) train from cached features; set train.cache_features: false"
        )
    if not len(model.side) and type(model.backbone).head is Backbone.head:
        raise ConfigError(
            f"train.cache_features: true trains the head site on cached pooled features through "
            f"Backbone.head(pooled), which backbone {model.backbone.name!r} ({type(model.backbone).__name__}) does "
            "not implement; set train.cache_features: false"
        )
    if train.cache_augmented_views:
        return
    for dataset in datasets:
        aug = random_augmentation(dataset)
        if aug:
            raise ConfigError(
                f"train.cache_features: true, but dataset {type(dataset).__name__} uses random augmentation ({aug}), "
                "and caching would freeze one random view per sample. Turn the augmentation off (e.g. "
                "data.args.augment: false), or set train.cache_augmented_views: true to train on one fixed, seeded "
                "augmented view per sample"
            )


def cached_datasets(model: TunedModel, datasets: Sequence[Dataset], collates: Sequence[Callable], train: TrainConfig,
                    *, batch_size: int, device: torch.device | str,
                    main_process_first: Callable[[], AbstractContextManager]) -> tuple[list[FeatureBatches], dict]:
    """The frozen features of ``datasets`` from ``FeatureCache(train.cache_dir, dtype=train.cache_dtype)``, built on
    ``device`` (the main process first, so the others reuse its entries) or reused, as
    ``FeatureBatches``; and a report ``{"dir", "entries", "built"}`` (built: entries computed now).
    The global RNG states are restored afterwards, so a build and a hit train identically."""
    check_cacheable(model, datasets, train)
    cache = FeatureCache(train.cache_dir, dtype=train.cache_dtype)
    saved = rng_state()
    try:
        with main_process_first():
            cached = [cache.dataset(model, ds, batch_size=batch_size, collate_fn=collate, device=device,
                                    cache_augmented_views=train.cache_augmented_views, view_seed=train.seed)
                      for ds, collate in zip(datasets, collates)]
    finally:
        set_rng_state(saved)
    report = {"dir": str(cache.root), "entries": [c.key for c in cached], "built": cache.builds}
    return [FeatureBatches(c, ds) for c, ds in zip(cached, datasets)], report


def forward_batch(model: nn.Module, batch: Mapping[str, Any], device: torch.device | str) -> Any:
    """The (possibly DDP-wrapped) model on one batch: cached ``features`` (moved to ``device``)
    or backbone ``inputs`` (placed by the accelerate data loader)."""
    if "features" in batch:
        return model(features=batch["features"].to(device))
    return model(**batch["inputs"])


