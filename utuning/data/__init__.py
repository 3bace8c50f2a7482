"""Datasets, batching and metrics: the data contract the engine, cache and side tuners rely on.

Building::

    ds = build_dataset(name, split="train", backbone=backbone, root="path/to/local/copy", **args)

``DATASETS`` (a ``utuning.registry.Registry``) is the one place dataset names are defined; a
builder is registered with ``@register_dataset("name")`` and called as
``fn(*, split, backbone=None, root=None, **args)``. Unknown names raise ``UnknownNameError`` with
the closest names, unknown args and missing local files raise ``ConfigError`` naming the path,
the expected layout and the ``download`` option where one exists. No loader touches the
network unless asked to with ``download=True``.

Items (unbatched)::

    {"inputs": {forward keyword arguments}, "labels": tensor}
    vision:  inputs {"pixel_values": (3, H, W) float}
    text:    inputs {"input_ids": (N,) long, "attention_mask": (N,) long[, "token_type_ids": (N,) long]}
    labels:  classification: () long    regression: () float
             labelling: (N,) long, -100 on special tokens and on all sub-tokens but a word's first
             qa: (2,) long [start, end] token indices, end inclusive; (0, 0) for no answer

Batching: ``collate(items, pad_token_id=0)`` stacks equal shapes and pads text to the longest
in the batch (``input_ids`` with the pad id, ``attention_mask``/``token_type_ids`` with 0,
sequence labels with -100). ``dataset.collate`` is the same with the dataset's own pad id (from
its tokenizer): use ``DataLoader(ds, collate_fn=ds.collate)``.

Dataset attributes:
  task         "classification" | "regression" | "labelling" | "qa"
  num_classes  int (qa: 2, a start and an end score per token), or None for regression
  metrics      metric names for ``compute_metrics``; the first is the main one
  label_names  list[str] or None (Y-Tuning builds label embeddings from them)
  transform    the image transform or None (``has_random_augmentation(ds.transform)`` tells the
               feature cache whether features change from epoch to epoch)
  tokenizer    text sets: the tokenizer used
  fingerprint() stable hash of name, split, args, files (size, mtime), subset and transform

Common args: ``subset`` (N examples) with ``subset_mode`` "first" or "stratified" (round-robin
over classes); vision: ``augment`` (False: test transforms for training too), ``img_size``,
``mean``, ``std``, ``crop_pct``; text: ``max_length``, ``tokenizer``. See docs/data.md.

Metrics: ``compute_metrics(names, preds, labels, label_names=None) -> {name: float}`` over the
``METRICS`` registry (accuracy, f1, macro_f1, matthews, pearson, spearman, pearson_spearman,
token_accuracy, seq_f1, qa_exact, qa_f1); preds may be scores (arg-maxed) or ids.
"""

from utuning.data import (  # noqa: F401  (registration)
    fgvc,
    glue,
    lexicon,  # noqa: F401  (registration: vader_valence)
    lm,
    spans,
    text,
    vision,
    vtab,
)
from utuning.data.base import (
    DATASETS,
    IGNORE_INDEX,
    TASKS,
    ItemDataset,
    build_dataset,
    collate,
    has_random_augmentation,
    register_dataset,
)
from utuning.data.metrics import METRICS, compute_metrics, register_metric
from utuning.data.vision import vision_transform

__all__ = [
    "DATASETS", "IGNORE_INDEX", "METRICS", "TASKS", "ItemDataset", "build_dataset", "collate", "compute_metrics",
    "has_random_augmentation", "register_dataset", "register_metric", "vision_transform",
]
