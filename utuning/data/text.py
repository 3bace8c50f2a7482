"""Text sets from local files: sentence (pair) classification and regression, sequence
labelling, extractive question answering, and the two offline sets ``finefoods`` and
``vader_lexicon``. Text is tokenized once, at build time, with the backbone's tokenizer
(``backbone.tokenizer``) or a ``tokenizer`` argument (a local folder or a cached hub name).

Files: ``<root>/<split>.{jsonl,json,csv,tsv}`` (``validation``, ``val`` and ``dev`` stand for
each other), or ``data_files={split: path}``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from utuning.data.base import ItemDataset, choose, register_dataset
from utuning.errors import ConfigError, DataError, closest
from utuning.tasks import IGNORE_INDEX

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


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} at offset {e.start}); "
                        "save the file as UTF-8") from None


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` pairs of a JSON-lines, JSON (a list, or ``{"data": [...]}``), CSV or TSV file.
    Bad encodings, malformed lines, rows that are not objects, CSV rows with missing or extra
    fields and files without rows are ``DataError``s naming the file and the real line."""
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise ConfigError(f"Cannot read {str(path)!r}: use one of {list(EXTENSIONS)}")
    text = _decode(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}): {line[:80]!r}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: a JSON-lines row must be an object, got {type(row).__name__} {row!r:.60}")
            rows.append((n, row))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        items = data["data"] if isinstance(data, Mapping) and "data" in data else data
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a list of rows (or {{\"data\": [...]}}), got {type(items).__name__}")
        for i, row in enumerate(items):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {i} must be an object, got {type(row).__name__} {row!r:.60}")
            rows.append((i, row))
    else:
        opts = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
        reader = csv.DictReader(io.StringIO(text, newline=""), **opts)
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                fields = len(reader.fieldnames or [])
                got = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise DataError(f"{path}:{reader.line_num}: the row has {got} fields, the header has {fields} "
                                f"({reader.fieldnames})")
            rows.append((reader.line_num, row))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines, JSON, CSV or TSV file (see ``read_rows`` for the checks)."""
    return [row for _, row in read_rows(path)]


def where_line(path: Path, line: int) -> str:
    return f"{path}:{line}" if path.suffix.lower() != ".json" else f"{path} item {line}"


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


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())


def infer_label_names(paths: Sequence[Path], key: str, *, nested: bool = False) -> list[str] | None:
    """Sorted distinct string labels of ``key`` over the files, or None when labels are integers.
    Integer and string labels mixed in one set are a ``DataError`` naming the first odd one out."""
    found: list[tuple[Any, str]] = []  # (value, where)
    for path in paths:
        try:
            rows = read_rows(path)
        except (ConfigError, OSError):
            continue  # a file that is not this data set's; a split's own file is checked when it is read
        for n, row in rows:
            if key in row and row[key] is not None:
                found += [(v, where_line(path, n)) for v in (row[key] if nested else [row[key]])]
    if not found:
        return None
    ints = [f for f in found if _is_int(f[0])]
    if len(ints) == len(found):
        return None
    if ints:
        odd = ints[0] if len(ints) <= len(found) - len(ints) else next(f for f in found if not _is_int(f[0]))
        raise DataError(f"{odd[1]}: label {odd[0]!r} mixes integer and string labels in {key!r} "
                        f"({len(ints)} integer, {len(found) - len(ints)} string); use one kind")
    return sorted({str(v) for v, _ in found})


def encode_label(value: Any, label_names: Sequence[str] | None, where: str) -> int:
    """A class index from a label name or an integer (strings of digits count as integers)."""
    if value is None:
        raise DataError(f"{where}: the label is null (or missing); every training and evaluation row needs one")
    if label_names is not None and str(value) in label_names:
        return list(label_names).index(str(value))
    if _is_int(value) and int(value) == IGNORE_INDEX:
        return IGNORE_INDEX  # an unlabelled row (e.g. GLUE test sets): no loss or metric counts it
    if _is_int(value) and (label_names is None or 0 <= int(value) < len(label_names)):
        return int(value)  # a class id (with label_names: an index into them)
    if isinstance(value, (bool, float)) or label_names is None:
        raise DataError(f"{where}: label {value!r} is not a class: use an integer class id or a string label name")
    raise DataError(f"{where}: label {value!r} is not one of {list(label_names)}; "
                    f"closest: {closest(str(value), label_names)}")


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
                           num_classes: int | None = None, locations: Sequence[str] | None = None) -> TextDataset:
    """Sentence (pair) classification or regression over rows of dicts."""
    choose("task", task, ("classification", "regression"))
    where = f"Dataset {name!r} split {split!r}"
    if locations is None:
        locations = [f"{where} row {i}" for i in range(len(rows))]
    keys = [k for k in (text_key, text_pair_key, label_key) if k is not None]
    for at, row in zip(locations, rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise DataError(f"{at}: the row has no key {missing[0]!r}; it has {sorted(row)} "
                            f"(closest: {closest(missing[0], row)})")
        empty = [k for k in keys[:-1] if row[k] is None]
        if empty:
            raise DataError(f"{at}: text field {empty[0]!r} is null")
    texts = [str(r[text_key]) for r in rows]
    pairs = [str(r[text_pair_key]) for r in rows] if text_pair_key else None
    if task == "regression":
        labels = [_number(r[label_key], at) for at, r in zip(locations, rows)]
        num_classes = None
    else:
        labels = [encode_label(r[label_key], label_names, at) for at, r in zip(locations, rows)]
        num_classes = num_classes or (len(label_names) if label_names else max(labels, default=0) + 1)
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return TextDataset(
        encodings=enc, labels=labels, tokenizer=tokenizer, name=name, split=split, task=task, num_classes=num_classes,
        metrics=list(metrics or METRICS_BY_TASK[task]), label_names=label_names, files=files,
        identity={**identity, **tokenizer_identity(tokenizer), "max_length": max_length}, subset=subset,
        subset_mode=subset_mode, locations=locations,
    )


def _number(value: Any, where: str) -> float:
    try:
        if value is None or isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: regression target {value!r} is not a number") from None


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
    numbered = read_rows(path)
    return classification_dataset(
        "text_classification", [r for _, r in numbered], split=split,
        locations=[where_line(path, n) for n, _ in numbered], tokenizer=tok, text_key=text_key,
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
