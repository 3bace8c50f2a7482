"""GLUE (Wang et al. 2018, arXiv 1804.07461) from a local copy, through 🤗 ``datasets``.

``root`` is one of:
  * a folder written by ``datasets.load_dataset("nyu-mll/glue", task).save_to_disk(root)``
    (or ``<root>/<task>/`` holding one);
  * a folder of ``<split>.{tsv,csv,jsonl,json}`` files with 🤗's column names (``sentence``,
    ``sentence1``/``sentence2``, ``question``/``sentence``, ``premise``/``hypothesis``, ``label``)
    or the original GLUE TSVs (``train.tsv``, ``dev.tsv``, ``dev_matched.tsv``...; the original
    column names such as ``#1 String``, ``is_duplicate``, ``score``, ``gold_label`` and CoLA's
    header-less files are read too), directly or under ``<root>/<task>/``.
``download=True`` (default False) calls ``datasets.load_dataset("nyu-mll/glue", task)`` instead.
GLUE's test splits have no public labels: they become -100 (ignored by losses and metrics).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utuning.data.base import IGNORE_INDEX, register_dataset
from utuning.data.text import EXTENSIONS, TextDataset, classification_dataset, read_records, resolve_tokenizer
from utuning.errors import ConfigError, closest

# task -> (text key, pair key, label names or None for regression, metrics: first is the main one)
GLUE_TASKS: dict[str, tuple[str, str | None, list[str] | None, list[str]]] = {
    "cola": ("sentence", None, ["unacceptable", "acceptable"], ["matthews", "accuracy"]),
    "sst2": ("sentence", None, ["negative", "positive"], ["accuracy"]),
    "mrpc": ("sentence1", "sentence2", ["not_equivalent", "equivalent"], ["f1", "accuracy"]),
    "qqp": ("question1", "question2", ["not_duplicate", "duplicate"], ["f1", "accuracy"]),
    "stsb": ("sentence1", "sentence2", None, ["pearson_spearman", "pearson", "spearman"]),
    "mnli": ("premise", "hypothesis", ["entailment", "neutral", "contradiction"], ["accuracy"]),
    "qnli": ("question", "sentence", ["entailment", "not_entailment"], ["accuracy"]),
    "rte": ("sentence1", "sentence2", ["entailment", "not_entailment"], ["accuracy"]),
    "wnli": ("sentence1", "sentence2", ["not_entailment", "entailment"], ["accuracy"]),
    "ax": ("premise", "hypothesis", ["entailment", "neutral", "contradiction"], ["accuracy"]),
}
# 🤗 column -> column names of the original GLUE TSVs
ORIGINAL_COLUMNS = {"label": ("Quality", "is_duplicate", "score", "gold_label"), "sentence1": ("#1 String",),
                    "sentence2": ("#2 String",), "premise": ("sentence1",), "hypothesis": ("sentence2",)}
COLA_COLUMNS = ["source", "label", "label_notes", "sentence"]
FILE_SPLITS = {"validation": ("validation", "dev", "val"), "validation_matched": ("validation_matched", "dev_matched"),
               "validation_mismatched": ("validation_mismatched", "dev_mismatched"),
               "test_matched": ("test_matched",), "test_mismatched": ("test_mismatched",)}


def _rows_from_disk(folder: Path, split: str) -> list[dict[str, Any]] | None:
    """Rows of ``split`` from a ``save_to_disk`` folder, or None if ``folder`` is not one."""
    if not ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        return None
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"GLUE copy {str(folder)!r} has no split {split!r}; it has {sorted(loaded)} "
                              f"(closest: {closest(split, list(loaded))})")
        loaded = loaded[split]
    return loaded.to_list()


def _read_file(path: Path, task: str) -> list[dict[str, Any]]:
    if task == "cola" and path.suffix == ".tsv":
        with open(path, encoding="utf-8", newline="") as f:
            first = f.readline().rstrip("\n").split("\t")
        if "sentence" not in first:  # CoLA's train/dev TSVs have no header
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, fieldnames=COLA_COLUMNS, delimiter="\t", quoting=csv.QUOTE_NONE))
    return read_records(path)


def _rows_from_files(folder: Path, split: str, task: str) -> tuple[list[dict[str, Any]], Path] | None:
    for stem in FILE_SPLITS.get(split, (split,)):
        for ext in EXTENSIONS:
            if (folder / f"{stem}{ext}").is_file():
                return _read_file(folder / f"{stem}{ext}", task), folder / f"{stem}{ext}"
    return None


def _normalise(row: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    row = dict(row)
    for key in keys:
        if key not in row:
            for alias in ORIGINAL_COLUMNS.get(key, ()):
                if alias in row:
                    row[key] = row[alias]
                    break
    return row


def load_glue_rows(task: str, split: str, root: Any, download: bool) -> tuple[list[dict[str, Any]], list[Path]]:
    if download:
        import datasets

        return datasets.load_dataset("nyu-mll/glue", task, split=split).to_list(), []
    layout = ("a `save_to_disk` copy of nyu-mll/glue (or <root>/<task>/ holding one), or <root>[/<task>]/<split>."
              "{tsv,csv,jsonl,json} files")
    if root is None:
        raise ConfigError(f"Dataset 'glue' ({task}) needs `root`: {layout}; or pass download=True")
    base = Path(root).expanduser()
    for folder in (base / task, base):
        if not folder.is_dir():
            continue
        rows = _rows_from_disk(folder, split)
        if rows is not None:
            return rows, [folder]
        found = _rows_from_files(folder, split, task)
        if found is not None:
            return found[0], [found[1]]
    raise ConfigError(f"Dataset 'glue': no split {split!r} of task {task!r} under {str(base)!r}; expected {layout}")


@register_dataset("glue")
def glue(*, split: str, backbone: Any = None, root: str | None = None, task: str = "sst2", download: bool = False,
         max_length: int = 128, tokenizer: Any = None, subset: int | None = None,
         subset_mode: str = "first") -> TextDataset:
    """A GLUE task (``task``: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, ax) with its
    sentence keys, label names and metrics (CoLA Matthews, STS-B Pearson/Spearman regression,
    MRPC/QQP F1 and accuracy, the rest accuracy). Splits: train, validation, test (MNLI:
    validation_matched, validation_mismatched, test_matched, test_mismatched)."""
    if task not in GLUE_TASKS:
        raise ConfigError(f"Unknown GLUE task {task!r}; did you mean {closest(task, GLUE_TASKS)}? Tasks: {list(GLUE_TASKS)}")
    text_key, pair_key, label_names, metrics = GLUE_TASKS[task]
    tok = resolve_tokenizer(backbone, tokenizer)
    rows, files = load_glue_rows(task, split, root, download)
    keys = [k for k in (text_key, pair_key, "label") if k]
    rows = [_normalise(r, keys) for r in rows]
    for r in rows:  # hidden test labels (-1 or empty) count for nothing
        if str(r.get("label", "")).strip() in ("", "-1", "-1.0"):
            r["label"] = IGNORE_INDEX
    return classification_dataset(
        "glue", rows, split=split, tokenizer=tok, text_key=text_key, text_pair_key=pair_key, label_key="label",
        label_names=label_names, task="classification" if label_names else "regression", metrics=metrics,
        max_length=max_length, files=files, identity={"task": task}, subset=subset, subset_mode=subset_mode,
        num_classes=len(label_names) if label_names else None,
    )
