"""Multi-class word sentiment from VADER's lexicon (Hutto & Gilbert 2014, ICWSM; MIT; the file
ships in the ``vaderSentiment`` wheel): each of its ~7,500 words (and emoticons) has a mean
human valence in [-4, 4]; ``vader_valence`` bins it into ``len(edges) + 1`` ordered classes.

Default edges ``(-2, 0, 2)`` give four classes (7,520 entries; train split 843 / 2,495 / 1,869 / 809)
named "very negative", "negative", "positive", "very positive", so that Y-Tuning's label-name
initialisation has meaningful names. A seeded stratified ``test_fraction`` is the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from utuning.data.base import choose, register_dataset
from utuning.data.text import TextDataset, _vader_file, classification_dataset, resolve_tokenizer
from utuning.errors import ConfigError

NAMES = {4: ["very negative", "negative", "positive", "very positive"],
         5: ["very negative", "negative", "neutral", "positive", "very positive"]}


def valence_class(valence: float, edges: Sequence[float]) -> int:
    """Index of the bin of ``valence``: bin k holds ``edges[k-1] <= valence < edges[k]``."""
    return sum(valence >= e for e in edges)


@register_dataset("vader_valence")
def vader_valence(*, split: str, backbone: Any = None, root: str | None = None,
                  edges: Sequence[float] = (-2.0, 0.0, 2.0), label_names: Sequence[str] | None = None,
                  test_fraction: float = 0.2, seed: int = 0, max_length: int = 16, tokenizer: Any = None,
                  subset: int | None = None, subset_mode: str = "first") -> TextDataset:
    """VADER words classified by valence bin (see the module docs)."""
    from utuning.data.vision import split_per_class

    choose("split", split, ("train", "test", "all"))
    edges = [float(e) for e in edges]
    if not edges or edges != sorted(set(edges)):
        raise ConfigError(f"Dataset 'vader_valence' argument edges={edges!r} must be strictly increasing and non-empty")
    names = list(label_names) if label_names is not None else NAMES.get(len(edges) + 1,
                                                                         [f"valence bin {k}" for k in range(len(edges) + 1)])
    if len(names) != len(edges) + 1:
        raise ConfigError(f"Dataset 'vader_valence': {len(edges)} edges make {len(edges) + 1} classes, but "
                          f"label_names has {len(names)}")
    path = _vader_file(root)
    words, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2:
                words.append(parts[0])
                labels.append(valence_class(float(parts[1]), edges))
    keep = range(len(words)) if split == "all" else split_per_class(labels, test_fraction, seed, split).tolist()
    rows = [{"text": words[i], "label": labels[i]} for i in keep]
    return classification_dataset(
        "vader_valence", rows, split=split, tokenizer=resolve_tokenizer(backbone, tokenizer), text_key="text",
        text_pair_key=None, label_key="label", label_names=names, task="classification",
        metrics=["accuracy", "macro_f1"], max_length=max_length, files=[path], subset=subset, subset_mode=subset_mode,
        identity={"edges": edges, "label_names": names, "test_fraction": test_fraction, "seed": seed},
        num_classes=len(names),
    )
