"""Checks of whole splits against each other, run before the first training step (see
docs/data.md, "What is an error"): every split non-empty; for classification, every evaluation
label occurs in the training split (an unseen class can never be predicted, and an integer beyond
the head's classes would crash evaluation after a whole epoch) and fits the model's classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from utuning.errors import DataError
from utuning.tasks import IGNORE_INDEX


def _where(ds: Any) -> str:
    files = [str(f) for f in getattr(ds, "_files", [])][:2]
    return f"{getattr(ds, 'name', type(ds).__name__)!r} split {getattr(ds, 'split', '?')!r}" + (
        f" ({', '.join(files)})" if files else "")


def class_targets(ds: Any) -> list[int] | None:
    """Integer class targets of the examples a dataset yields, when it can tell without loading them."""
    found = getattr(ds, "class_targets", None)
    return found() if callable(found) else None


def _name(ds: Any, label: int) -> str:
    names = getattr(ds, "label_names", None)
    return f"{names[label]!r} (class {label})" if names and 0 <= label < len(names) else f"{label}"


def check_splits(task: str, datasets: Sequence[Any], *, num_classes: int | None = None) -> None:
    """``datasets[0]`` is the training split; raise ``DataError`` naming split, file, line and value."""
    for ds in datasets:
        if len(ds) == 0:
            raise DataError(f"Dataset {_where(ds)} has no examples")
    if task != "classification":
        return
    train = class_targets(datasets[0])
    if train is None:
        return
    seen = set(train)
    classes = num_classes or getattr(datasets[0], "num_classes", None)
    for ds in datasets:
        targets = class_targets(ds)
        if targets is None:
            continue
        locate = getattr(ds, "location", None)
        for i, label in enumerate(targets):
            if label == IGNORE_INDEX:
                continue  # unlabelled rows (e.g. GLUE test sets)
            at = f" at {locate(i)}" if callable(locate) else f" (example {i})"
            if classes is not None and not 0 <= label < classes:
                raise DataError(f"Dataset {_where(ds)}: label {_name(ds, label)}{at} is outside the {classes} classes "
                                f"of the model (0..{classes - 1})")
            if ds is not datasets[0] and label not in seen:
                raise DataError(f"Dataset {_where(ds)}: label {_name(ds, label)}{at} never occurs in the training "
                                f"split {_where(datasets[0])}; the model could never predict it. Training classes: "
                                f"{sorted(_name(datasets[0], c) for c in seen)[:20]}")


def data_description(ds: Any) -> dict[str, Any]:
    """What tuners may take from the data (``Tuner.from_data``): its classes and label names."""
    return {"num_classes": getattr(ds, "num_classes", None), "label_names": getattr(ds, "label_names", None)}
