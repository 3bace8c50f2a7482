"""Text sets from local files: sentence (pair) classification and regression, sequence
labelling, extractive question answering, and the two offline sets ``finefoods`` and
``vader_lexicon``. Text is tokenized once, at build time, with the backbone's tokenizer
(``backbone.tokenizer``) or a ``tokenizer`` argument (a local folder or a cached hub name).

Files: ``<root>/<split>.{jsonl,json,csv,tsv}`` (``validation``, ``val`` and ``dev`` stand for
each other), or ``data_files={split: path}``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from utuning.data.base import ItemDataset, choose, register_dataset
from utuning.errors import ConfigError, closest

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")
SPLIT_ALIASES = {"validation": ("dev", "val"), "val": ("validation", "dev"), "dev": ("validation", "val")}
METRICS_BY_TASK = {"classification": ["accuracy"], "regression": ["pearson_spearman", "pearson", "spearman"],
                   "labelling": ["seq_f1", "token_accuracy"], "qa": ["qa_f1", "qa_exact"]}


def resolve_tokenizer(backbone: Any, tokenizer: Any = None) -> Any:
    """``tokenizer`` (a folder or name loaded with ``local_files_only``, or a tokenizer object), else
    the backbone's ``tokenizer`` attribute, else (a recipe's backbone section) the tokenizer of
    its ``model`` folder."""
    if tokenizer is None:
        found = getattr(backbone, "tokenizer", None)
        if found is not None:
            return found
        model = getattr(backbone, "model", None)
        if not isinstance(model, (str, Path)):
            raise ConfigError("Text datasets need a tokenizer: pass a text backbone (with a `tokenizer` attribute) "
                              "or the data argument `tokenizer` (a local tokenizer folder)")
        tokenizer = model
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"Cannot load tokenizer {str(tokenizer)!r} from local files: {err}. "
                              "Give the data argument `tokenizer` (a local tokenizer folder)") from err
    return tokenizer


def tokenizer_identity(tok: Any) -> dict[str, Any]:
    return {"tokenizer": str(getattr(tok, "name_or_path", "")), "class": type(tok).__name__, "vocab": len(tok)}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines, JSON (a list, or ``{"data": [...]}``), CSV or TSV file."""
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="" if suffix in (".csv", ".tsv") else None) as f:
        if suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.load(f)
            return data["data"] if isinstance(data, Mapping) and "data" in data else list(data)
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else csv.DictReader(f)
            return list(reader)
    raise ConfigError(f"Cannot read {str(path)!r}: use one of {list(EXTENSIONS)}")


def split_file(name: str, root: Any, split: str, data_files: Mapping[str, Any] | None) -> Path:
    """The file of ``split``: ``data_files[split]`` or ``<root>/<split>.<ext>`` (with split aliases)."""
    if data_files:
        if split not in data_files:
            raise ConfigError(f"Dataset {name!r}: data_files has no split {split!r}; it has {sorted(data_files)} "
                              f"(closest: {closest(split, data_files)})")
        path = Path(data_files[split]).expanduser()
        if not path.is_file():
            raise ConfigError(f"Dataset {name!r}: file {str(path)!r} for split {split!r} does not exist")
        return path
    layout = f"<root>/{split}{{{','.join(EXTENSIONS)}}}"
    if root is None:
        raise ConfigError(f"Dataset {name!r} needs `root` (a folder with {layout}) or `data_files`")
    folder = Path(root).expanduser()
    for candidate in (split, *SPLIT_ALIASES.get(split, ())):
        for ext in EXTENSIONS:
            if (folder / f"{candidate}{ext}").is_file():
                return folder / f"{candidate}{ext}"
    present = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
    raise ConfigError(f"Dataset {name!r}: no file for split {split!r} in {str(folder)!r}; expected {layout}. "
                      f"Found: {present[:10]}")


def sibling_files(path: Path) -> list[Path]:
    """The other split files next to ``path`` (used to infer one label set for all splits)."""
    return sorted(p for p in path.parent.glob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def infer_label_names(paths: Sequence[Path], key: str, *, nested: bool = False) -> list[str] | None:
    """Sorted distinct string labels of ``key`` over the files, or None when labels are integers."""
    values: set[Any] = set()
    for path in paths:
        try:
            rows = read_records(path)
        except (ValueError, ConfigError, UnicodeDecodeError):
            continue
        for row in rows:
            if key in row:
                values.update(row[key] if nested else [row[key]])
    if not values or all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values):
        return None
    return sorted(str(v) for v in values)


def encode_label(value: Any, label_names: Sequence[str] | None, where: str) -> int:
    """A class index from a label name or an integer (strings of digits count as integers)."""
    if label_names is not None and str(value) in label_names:
        return list(label_names).index(str(value))
    if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        return int(value)
    raise ConfigError(f"{where}: label {value!r} is not one of {list(label_names or [])}; "
                      f"closest: {closest(str(value), label_names or [])}")


class TextDataset(ItemDataset):
    """Tokenized examples: ``encodings`` (key -> list of token id lists) and one label per example."""

    def __init__(self, *, encodings: Mapping[str, list], labels: list, tokenizer: Any, subset: int | None,
                 subset_mode: str, **kwargs: Any) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        super().__init__(pad_token_id=pad, **kwargs)
        self.tokenizer = tokenizer
        self.encodings = {k: v for k, v in encodings.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        self.labels = labels
        targets = labels if self.task == "classification" else None
        self.select(len(labels), targets=targets, subset=subset, subset_mode=subset_mode)

    def example(self, j: int) -> dict[str, Any]:
        inputs = {k: torch.tensor(v[j], dtype=torch.long) for k, v in self.encodings.items()}
        dtype = torch.float32 if self.task == "regression" else torch.long
        return {"inputs": inputs, "labels": torch.tensor(self.labels[j], dtype=dtype)}


def classification_dataset(name: str, rows: list[Mapping[str, Any]], *, split: str, tokenizer: Any, text_key: str,
                           text_pair_key: str | None, label_key: str, label_names: Sequence[str] | None, task: str,
                           metrics: Sequence[str] | None, max_length: int, files: Sequence[Path],
                           identity: Mapping[str, Any], subset: int | None, subset_mode: str,
                           num_classes: int | None = None) -> TextDataset:
    """Sentence (pair) classification or regression over rows of dicts."""
    choose("task", task, ("classification", "regression"))
    where = f"Dataset {name!r} split {split!r}"
    keys = [k for k in (text_key, text_pair_key, label_key) if k is not None]
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ConfigError(f"{where}: row {i} has no key {missing[0]!r}; it has {sorted(row)} "
                              f"(closest: {closest(missing[0], row)})")
    texts = [str(r[text_key]) for r in rows]
    pairs = [str(r[text_pair_key]) for r in rows] if text_pair_key else None
    if task == "regression":
        labels = [float(r[label_key]) for r in rows]
        num_classes = None
    else:
        labels = [encode_label(r[label_key], label_names, where) for r in rows]
        num_classes = num_classes or (len(label_names) if label_names else max(labels, default=0) + 1)
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return TextDataset(
        encodings=enc, labels=labels, tokenizer=tokenizer, name=name, split=split, task=task, num_classes=num_classes,
        metrics=list(metrics or METRICS_BY_TASK[task]), label_names=label_names, files=files,
        identity={**identity, **tokenizer_identity(tokenizer), "max_length": max_length}, subset=subset,
        subset_mode=subset_mode,
    )


@register_dataset("text_classification")
def text_classification(*, split: str, backbone: Any = None, root: str | None = None,
                        data_files: Mapping[str, str] | None = None, text_key: str = "text",
                        text_pair_key: str | None = None, label_key: str = "label",
                        label_names: Sequence[str] | None = None, task: str = "classification",
                        metrics: Sequence[str] | None = None, max_length: int = 128, tokenizer: Any = None,
                        subset: int | None = None, subset_mode: str = "first") -> TextDataset:
    """Local text (pair) classification / regression files. String labels without ``label_names``
    are named in sorted order of all labels in the split files next to this one."""
    tok = resolve_tokenizer(backbone, tokenizer)
    path = split_file("text_classification", root, split, data_files)
    if label_names is None and task == "classification":
        label_names = infer_label_names(list(data_files.values()) if data_files else sibling_files(path), label_key)
    return classification_dataset(
        "text_classification", read_records(path), split=split, tokenizer=tok, text_key=text_key,
        text_pair_key=text_pair_key, label_key=label_key, label_names=label_names, task=task, metrics=metrics,
        max_length=max_length, files=[path], subset=subset, subset_mode=subset_mode,
        identity={"text_key": text_key, "text_pair_key": text_pair_key, "label_key": label_key},
    )


@register_dataset("finefoods")
def finefoods(*, split: str, backbone: Any = None, root: str | None = None, max_length: int = 128,
              tokenizer: Any = None, subset: int | None = None, subset_mode: str = "first") -> TextDataset:
    """Amazon fine-food reviews, ``great`` (5 stars, class 1) vs ``other`` (class 0):
    ``<root>/{train,test}.jsonl`` with keys text, label."""
    return text_classification(split=split, backbone=backbone, root=root, label_names=["other", "great"],
                               metrics=["accuracy", "f1"], max_length=max_length, tokenizer=tokenizer, subset=subset,
                               subset_mode=subset_mode)


@register_dataset("vader_lexicon")
def vader_lexicon(*, split: str, backbone: Any = None, root: str | None = None, threshold: float = 1.0,
                  test_fraction: float = 0.2, seed: int = 0, max_length: int = 16, tokenizer: Any = None,
                  subset: int | None = None, subset_mode: str = "first") -> TextDataset:
    """Word sentiment from VADER's lexicon (Hutto & Gilbert 2014; MIT; the file ships in the
    ``vaderSentiment`` wheel): mean valence >= ``threshold`` is positive, <= -``threshold``
    negative, the rest dropped; a seeded stratified ``test_fraction`` is the test split."""
    from utuning.data.vision import split_per_class

    choose("split", split, ("train", "test", "all"))
    path = _vader_file(root)
    words, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                continue
            valence = float(parts[1])
            if abs(valence) >= threshold:
                words.append(parts[0])
                labels.append(int(valence > 0))
    keep = range(len(words)) if split == "all" else split_per_class(labels, test_fraction, seed, split).tolist()
    rows = [{"text": words[i], "label": labels[i]} for i in keep]
    return classification_dataset(
        "vader_lexicon", rows, split=split, tokenizer=resolve_tokenizer(backbone, tokenizer), text_key="text",
        text_pair_key=None, label_key="label", label_names=["negative", "positive"], task="classification",
        metrics=["accuracy", "f1"], max_length=max_length, files=[path], subset=subset, subset_mode=subset_mode,
        identity={"threshold": threshold, "test_fraction": test_fraction, "seed": seed},
    )


def _vader_file(root: Any) -> Path:
    if root is not None:
        path = Path(root).expanduser()
        path = path / "vader_lexicon.txt" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"Dataset 'vader_lexicon': {str(path)!r} not found; give the vader_lexicon.txt file "
                              "or the folder holding it")
        return path
    try:
        import vaderSentiment
    except ImportError as err:
        raise ConfigError("Dataset 'vader_lexicon' reads the lexicon shipped in the vaderSentiment package: "
                          "pip install vaderSentiment (or utuning[demo]), or pass `root`") from err
    return Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
