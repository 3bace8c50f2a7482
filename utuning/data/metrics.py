"""Evaluation metrics (numpy only), in one registry: ``compute_metrics(names, preds, labels)``.

Every metric returns a fraction in [0, 1] (correlations in [-1, 1], ``mse`` >= 0), never a percentage.
``preds`` may be scores (one more trailing dimension than ``labels``: arg-maxed) or predicted
ids; positions whose label is -100 are ignored (special and pad tokens of sequence labelling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from utuning.errors import ConfigError
from utuning.registry import Registry
from utuning.tasks import IGNORE_INDEX

METRICS: Registry = Registry("metric")


def register_metric(name: str) -> Callable:
    """Decorator: ``fn(preds, labels, *, label_names=None) -> float`` known as ``name``."""
    return METRICS.register(name)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _classes(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true ids of the counted positions, flattened."""
    if preds.ndim == labels.ndim + 1:
        preds = preds.argmax(-1)
    if preds.shape != labels.shape:
        raise ConfigError(f"Predictions of shape {preds.shape} do not fit labels of shape {labels.shape}")
    keep = labels != IGNORE_INDEX
    return preds[keep].astype(np.int64), labels[keep].astype(np.int64)


def _values(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = preds.astype(np.float64).reshape(-1), labels.astype(np.float64).reshape(-1)
    if preds.shape != labels.shape:
        raise ConfigError(f"Regression predictions ({preds.size}) and labels ({labels.size}) differ in size")
    return preds, labels


def _f1(p: np.ndarray, t: np.ndarray, cls: int) -> float:
    tp = float(np.sum((p == cls) & (t == cls)))
    fp = float(np.sum((p == cls) & (t != cls)))
    fn = float(np.sum((p != cls) & (t == cls)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


@register_metric("accuracy")
def accuracy(preds, labels, *, label_names=None) -> float:
    p, t = _classes(preds, labels)
    return float(np.mean(p == t)) if t.size else 0.0


@register_metric("f1")
def f1(preds, labels, *, label_names=None) -> float:
    """Binary F1 of class 1 (GLUE MRPC / QQP)."""
    return _f1(*_classes(preds, labels), 1)


@register_metric("macro_f1")
def macro_f1(preds, labels, *, label_names=None) -> float:
    """Mean F1 over the classes present in labels or predictions."""
    p, t = _classes(preds, labels)
    classes = np.union1d(p, t)
    return float(np.mean([_f1(p, t, int(c)) for c in classes])) if classes.size else 0.0


@register_metric("matthews")
def matthews(preds, labels, *, label_names=None) -> float:
    """Matthews correlation (multi-class form, GLUE CoLA); 0 when undefined."""
    p, t = _classes(preds, labels)
    n = int(max(p.max(initial=0), t.max(initial=0))) + 1
    cm = np.zeros((n, n), dtype=np.float64)
    np.add.at(cm, (t, p), 1)
    t_sum, p_sum, correct, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    den = np.sqrt((s * s - p_sum @ p_sum) * (s * s - t_sum @ t_sum))
    return float((correct * s - t_sum @ p_sum) / den) if den else 0.0


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    ranks = np.empty(x.size)
    ranks[np.argsort(x, kind="mergesort")] = np.arange(1, x.size + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / den) if den else 0.0


@register_metric("pearson")
def pearson(preds, labels, *, label_names=None) -> float:
    return _pearson(*_values(preds, labels))


@register_metric("spearman")
def spearman(preds, labels, *, label_names=None) -> float:
    p, t = _values(preds, labels)
    return _pearson(_rank(p), _rank(t))


@register_metric("mse")
def mse(preds, labels, *, label_names=None) -> float:
    """Mean squared error (lower is better)."""
    p, t = _values(preds, labels)
    return float(np.mean((p - t) ** 2)) if t.size else 0.0


@register_metric("pearson_spearman")
def pearson_spearman(preds, labels, *, label_names=None) -> float:
    """Mean of Pearson and Spearman correlation (GLUE STS-B)."""
    return (pearson(preds, labels) + spearman(preds, labels)) / 2


@register_metric("token_accuracy")
def token_accuracy(preds, labels, *, label_names=None) -> float:
    """Accuracy over the labelled tokens (labels -100 are skipped)."""
    return accuracy(preds, labels)


def bio_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """Entity spans ``(start, end, type)`` (end inclusive) of BIO / IOB2 tags, as conlleval reads them:
    ``I-X`` after anything but ``B-X``/``I-X`` starts a new entity."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, typ = tag.partition("-") if tag != "O" else ("O", "", "")
        continues = prefix == "I" and kind == typ and start is not None
        if start is not None and not continues:
            spans.add((start, i - 1, kind))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, typ
    return spans


@register_metric("seq_f1")
def seq_f1(preds, labels, *, label_names=None) -> float:
    """Entity-level micro F1 of BIO tags (needs ``label_names``; without them: token accuracy)."""
    if label_names is None:
        return token_accuracy(preds, labels)
    labels = np.asarray(labels)
    preds = np.asarray(preds)
    if preds.ndim == labels.ndim + 1:
        preds = preds.argmax(-1)
    if labels.ndim == 1:
        preds, labels = preds[None], labels[None]
    tp = n_pred = n_true = 0
    for p_row, t_row in zip(preds, labels):
        keep = t_row != IGNORE_INDEX
        p_spans = bio_spans([label_names[int(i)] for i in p_row[keep]])
        t_spans = bio_spans([label_names[int(i)] for i in t_row[keep]])
        tp += len(p_spans & t_spans)
        n_pred += len(p_spans)
        n_true += len(t_spans)
    return 2 * tp / (n_pred + n_true) if n_pred + n_true else 0.0


def _spans(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 2) predicted and true [start, end] token indices; (B, N, 2) scores are decoded to the
    best span with end >= start."""
    if preds.ndim == 3:
        start = preds[..., 0].argmax(-1)
        masked = np.where(np.arange(preds.shape[1])[None] >= start[:, None], preds[..., 1], -np.inf)
        preds = np.stack([start, masked.argmax(-1)], axis=-1)
    if preds.shape != labels.shape or labels.ndim != 2 or labels.shape[1] != 2:
        raise ConfigError(f"QA predictions {preds.shape} and labels {labels.shape} must both be (B, 2) [start, end]")
    return preds.astype(np.int64), labels.astype(np.int64)


@register_metric("qa_exact")
def qa_exact(preds, labels, *, label_names=None) -> float:
    """Share of examples whose predicted token span equals the answer span."""
    p, t = _spans(preds, labels)
    return float(np.mean(np.all(p == t, axis=1))) if len(t) else 0.0


@register_metric("qa_f1")
def qa_f1(preds, labels, *, label_names=None) -> float:
    """Mean token-overlap F1 between predicted and answer spans (unanswerable (0, 0): 1 if both are)."""
    p, t = _spans(preds, labels)
    scores = []
    for (ps, pe), (ts, te) in zip(p, t):
        if (ts, te) == (0, 0) or (ps, pe) == (0, 0):
            scores.append(float((ps, pe) == (ts, te)))
            continue
        overlap = max(0, min(pe, te) - max(ps, ts) + 1)
        if overlap == 0 or pe < ps:
            scores.append(0.0)
            continue
        precision, recall = overlap / (pe - ps + 1), overlap / (te - ts + 1)
        scores.append(2 * precision * recall / (precision + recall))
    return float(np.mean(scores)) if scores else 0.0


def compute_metrics(names: Sequence[str], preds: Any, labels: Any, *,
                    label_names: Sequence[str] | None = None) -> dict[str, float]:
    """``{name: value}`` for each metric name; ``preds``/``labels`` are tensors or arrays of the whole
    evaluation set. ``label_names`` lets ``seq_f1`` read BIO tags."""
    fns = [METRICS.get(n) for n in names]  # unknown names fail before any work
    p, t = _numpy(preds), _numpy(labels)
    return {n: float(fn(p, t, label_names=label_names)) for n, fn in zip(names, fns)}
