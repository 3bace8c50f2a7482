"""The dataset base class, the dataset registry, ``build_dataset`` and ``collate``.

Every dataset yields ``{"inputs": {forward keyword args, unbatched}, "labels": tensor}`` and
carries what the training engine, the feature cache and the side tuners need to know about it
(``task``, ``num_classes``, ``metrics``, ``label_names``, ``transform``, ``fingerprint()``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from utuning.errors import ConfigError, closest
from utuning.fingerprint import file_digest
from utuning.registry import Registry
from utuning.tasks import IGNORE_INDEX, TASKS

DATASETS: Registry = Registry("dataset")
# Padding value of each known input key; any other key pads with 0.
_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0}


def register_dataset(name: str) -> Callable:
    """Decorator: make a dataset builder ``fn(*, split, backbone=None, root=None, **args)`` known as ``name``."""
    return DATASETS.register(name)


def build_dataset(name: str, *, split: str, backbone: Any = None, root: str | Path | None = None,
                  **args: Any) -> ItemDataset:
    """Build the registered dataset ``name`` for ``split``; unknown ``args`` are errors."""
    builder = DATASETS.get(name)
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                 and n not in ("split", "backbone", "root")]
        for key in args:
            if key not in known:
                raise ConfigError(f"Dataset {name!r} has no argument {key!r}. Did you mean {closest(key, known)}? "
                                  f"Arguments: {sorted(known)}")
    return builder(split=split, backbone=backbone, root=root, **args)


def choose(arg: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ConfigError(f"{arg}={value!r} is not one of {list(choices)}; did you mean {closest(str(value), [str(c) for c in choices])}?")
    return value


def file_identity(paths: Sequence[Path]) -> list[list[Any]]:
    """(path, size, content digest) of each file (or of each file under a folder) for
    fingerprints: the bytes decide (``utuning.fingerprint.file_digest``), not the mtime."""
    out = []
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files[:10_000]:
            out.append([str(f.resolve()), f.stat().st_size, file_digest(f)])
    return out


def stratified_order(targets: Sequence[int]) -> list[int]:
    """Indices in round-robin order over classes (each class in its original order)."""
    by_class: dict[Any, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    queues = [by_class[k] for k in sorted(by_class)]
    order, depth = [], 0
    while len(order) < len(targets):
        order.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return order


class ItemDataset(Dataset):
    """Base class of utuning datasets: a list of examples addressed through ``self.index``.

    Subclasses call ``super().__init__`` with their identity, then ``self.select(targets)`` and
    implement ``example(j)`` for the ``j``-th example of the underlying source.
    """

    task: str = "classification"

    def __init__(self, *, name: str, split: str, num_classes: int | None, metrics: Sequence[str],
                 label_names: Sequence[str] | None = None, transform: Callable | None = None,
                 identity: Mapping[str, Any] | None = None, files: Sequence[Path] = (),
                 task: str | None = None, pad_token_id: int = 0, locations: Sequence[str] | None = None) -> None:
        self.name = name
        self.split = split
        self.task = choose("task", task or self.task, list(TASKS))
        self.num_classes = num_classes
        self.metrics = list(metrics)
        self.label_names = list(label_names) if label_names is not None else None
        self.transform = transform
        self.pad_token_id = int(pad_token_id)
        self._identity = dict(identity or {})
        self._files = [Path(f) for f in files]
        self.index: list[int] = []
        self._subset: tuple[int | None, str] = (None, "first")
        self._targets: list[int] | None = None
        self._locations = list(locations) if locations is not None else None

    def select(self, size: int, *, targets: Sequence[Any] | None = None, subset: int | None = None,
               subset_mode: str = "first") -> None:
        """Use all ``size`` examples, or the first / class-stratified ``subset`` of them."""
        choose("subset_mode", subset_mode, ("first", "stratified"))
        order = list(range(size))
        if subset is not None:
            if not isinstance(subset, int) or isinstance(subset, bool) or subset < 1:
                raise ConfigError(f"subset={subset!r} must be a positive number of examples")
            if subset_mode == "stratified":
                if targets is None:
                    raise ConfigError(f"Dataset {self.name!r} ({self.task}) has no class labels to stratify a subset by")
                order = sorted(stratified_order(targets)[:subset])
            else:
                order = order[:subset]
        self.index = order
        self._subset = (subset, subset_mode)
        self._targets = [int(t) for t in targets] if targets is not None else None

    def hold_out(self, fraction: float, *, seed: int = 0, part: str = "rest") -> None:
        """Keep one part of a seeded split of this dataset's examples: ``part="holdout"`` the held-out
        ``fraction`` (per class where there are class labels, so every class with two or more
        examples is in both parts), ``"rest"`` the others. Both parts of the same fraction and seed
        partition the examples; the fingerprint names the part."""
        choose("part", part, ("holdout", "rest"))
        targets = self.class_targets()
        groups: dict[Any, list[int]] = {}
        for i in range(len(self.index)):
            groups.setdefault(targets[i] if targets is not None else None, []).append(i)
        g = torch.Generator().manual_seed(int(seed))
        held: set[int] = set()
        for key in sorted(groups, key=repr):
            members = groups[key]
            n = round(fraction * len(members))
            n = min(max(n, 1 if len(members) > 1 else 0), len(members) - 1) if targets is not None else n
            held.update(members[int(k)] for k in torch.randperm(len(members), generator=g)[:n])
        keep = [i for i in range(len(self.index)) if (i in held) == (part == "holdout")]
        if not keep:
            raise ConfigError(f"data.holdout={fraction!r} leaves the {part} part of {self.name!r} split "
                              f"{self.split!r} ({len(self.index)} examples) empty; choose a fraction between "
                              f"{1 / max(len(self.index), 1):.3g} and {1 - 1 / max(len(self.index), 1):.3g}")
        self.index = [self.index[i] for i in keep]
        self._holdout = (float(fraction), int(seed), part)

    _holdout: tuple[float, int, str] | None = None

    def class_targets(self) -> list[int] | None:
        """The integer classes of the examples this dataset yields (classification), or None."""
        if self._targets is None or self.task != "classification":
            return None
        return [self._targets[j] for j in self.index]

    def location(self, i: int) -> str:
        """Where example ``i`` comes from (``file:line`` for text files), for error messages."""
        j = self.index[i]
        return self._locations[j] if self._locations is not None else f"example {j}"

    def example(self, j: int) -> dict[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.example(self.index[i])

    def fingerprint(self) -> str:
        """Stable hash of the data identity: name, split, files (size and content digest), args, transform."""
        ident = {
            "name": self.name, "split": self.split, "task": self.task, "subset": list(self._subset),
            **({"holdout": list(self._holdout)} if self._holdout is not None else {}),
            "args": self._identity, "files": file_identity(self._files),
            "transform": None if self.transform is None else repr(self.transform),
        }
        blob = json.dumps(ident, sort_keys=True, default=repr).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def collate(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``collate`` with this dataset's pad token id (use as a DataLoader's ``collate_fn``)."""
        return collate(items, pad_token_id=self.pad_token_id)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, size={len(self)}, "
                f"task={self.task!r}, num_classes={self.num_classes})")


def _stack(values: list[Tensor], pad: int) -> Tensor:
    """Stack tensors, padding the first dim to the longest when lengths differ."""
    if all(v.shape == values[0].shape for v in values):
        return torch.stack(values)
    if any(v.dim() != 1 for v in values):
        raise ConfigError(f"Cannot batch tensors of shapes {sorted({tuple(v.shape) for v in values})}: "
                          "only 1-d sequences are padded")
    out = values[0].new_full((len(values), max(v.shape[0] for v in values)), pad)
    for row, v in zip(out, values):
        row[: v.shape[0]] = v
    return out


def collate(items: Sequence[Mapping[str, Any]], *, pad_token_id: int = 0) -> dict[str, Any]:
    """Batch items: stack equal shapes, pad text to the longest in the batch.

    ``input_ids`` pad with ``pad_token_id``, ``attention_mask`` and ``token_type_ids`` with 0,
    sequence labels with -100. Labels that are dicts (``{"start", "end"}``) are batched per key.
    """
    if not items:
        raise ConfigError("collate() got an empty batch")
    keys = list(items[0]["inputs"])
    inputs = {k: _stack([it["inputs"][k] for it in items], _PAD_VALUES.get(k, pad_token_id if k == "input_ids" else 0))
              for k in keys}
    labels = [it["labels"] for it in items]
    if isinstance(labels[0], Mapping):
        batched = {k: _stack([lab[k] for lab in labels], IGNORE_INDEX) for k in labels[0]}
    else:
        batched = _stack(labels, IGNORE_INDEX)
    return {"inputs": inputs, "labels": batched}


def has_random_augmentation(transform: Any) -> bool:
    """Whether a torchvision transform (or Compose of them) is random (so features vary per epoch)."""
    if transform is None:
        return False
    inner = getattr(transform, "transforms", None)
    if inner is not None:
        return any(has_random_augmentation(t) for t in inner)
    return type(transform).__name__.startswith("Random") or type(transform).__name__ in {
        "ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix"}
