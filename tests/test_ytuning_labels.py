"""Y-Tuning's labels come from the data (``Tuner.from_data`` through ``utuning.tune(..., data=)``);
string names initialise the label queries from the frozen text model's embeddings of the names."""

from __future__ import annotations

import inspect

import pytest
import torch

import utuning
import utuning.model
from tests.helpers import vit_backbone
from tests.test_side_tuners import StubText
from utuning.errors import ConfigError
from utuning.tuners.ytuning import separated_rows

NAMES = ["very negative", "negative", "positive", "very positive"]


def labels_of(tuned: utuning.TunedModel) -> torch.Tensor:
    return tuned.side["ytuning"].labels.detach()


def test_num_labels_and_names_default_to_the_data_and_are_stored_in_the_spec():
    tuned = utuning.tune(StubText(), [("ytuning", "blocks.*", {})], data={"num_classes": 4, "label_names": NAMES})
    embed = tuned.backbone.slot("embed").handle
    torch.testing.assert_close(labels_of(tuned), separated_rows(embed.embed_text(NAMES)))  # the paper's init
    assert tuned.specs[0].args["num_labels"] == 4 and tuned.specs[0].args["label_names"] == NAMES
    assert tuned(**{"input_ids": torch.randint(1, 50, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.bool)}
                 ).shape == (2, 4)


def test_name_init_can_be_turned_off_and_numeric_names_are_not_names():
    data = {"num_classes": 4, "label_names": NAMES}
    off = utuning.tune(StubText(), [("ytuning", "blocks.*", {"name_init": False})], data=data)
    on = utuning.tune(StubText(), [("ytuning", "blocks.*", {})], data=data)
    assert not torch.allclose(labels_of(off), labels_of(on))
    gram = labels_of(off) @ labels_of(off).T / 16  # a regular simplex: cosine -1/(L-1) between labels
    torch.testing.assert_close(gram, torch.eye(4) * 4 / 3 - 1 / 3, atol=1e-5, rtol=0)
    numeric = utuning.tune(StubText(), [("ytuning", "blocks.*", {})], data={"num_classes": 3, "label_names": ["0", "1", "2"]})
    assert numeric.specs[0].args == {"num_labels": 3} and labels_of(numeric).shape == (3, 16)


def test_vision_data_without_names_fills_num_labels_only():
    tuned = utuning.tune(vit_backbone(depth=2), [("ytuning", "blocks.*", {})], data={"num_classes": 7, "label_names": None})
    assert tuned(pixel_values=torch.randn(2, 3, 32, 32)).shape == (2, 7)
    # names on a backbone that cannot embed text: kept as names, orthonormal start (name_init unset)
    named = utuning.tune(vit_backbone(depth=2), [("ytuning", "blocks.*", {})], data={"num_classes": 2, "label_names": ["cat", "dog"]})
    assert named.side["ytuning"].label_names == ["cat", "dog"]


@pytest.mark.parametrize(("args", "data", "match"), [
    ({"num_labels": 3}, {"num_classes": 4}, r"'ytuning' argument num_labels=3 does not match the data's num_classes=4"),
    ({"label_names": ["a", "b"]}, {"num_classes": 2, "label_names": ["neg", "pos"]}, r"label_names=\['a', 'b'\].*label_names=\['neg', 'pos'\]"),
    ({"label_names": ["a", "b", "c"]}, {"num_classes": 2, "label_names": ["0", "1"]}, r"label_names=\['a', 'b', 'c'\]"),
])
def test_a_recipe_that_contradicts_the_data_is_a_clear_error(args, data, match):
    with pytest.raises(ConfigError, match=match):
        utuning.tune(StubText(), [("ytuning", "blocks.*", args)], data=data)


def test_descriptive_names_for_integer_labels_are_accepted():
    tuned = utuning.tune(StubText(), [("ytuning", "blocks.*", {"label_names": ["bad", "good"]})],
                         data={"num_classes": 2, "label_names": ["0", "1"]})
    assert tuned.side["ytuning"].label_names == ["bad", "good"]


def test_span_and_tuners_without_from_data_ignore_the_data():
    span = utuning.tune(StubText(), [("ytuning", "blocks.1", {"task": "span"})], data={"num_classes": 9})
    assert span.specs[0].args == {"task": "span"}
    lora = utuning.tune(vit_backbone(depth=2), [("lora", "blocks.*.attn.qkv", {"rank": 2})], data={"num_classes": 9})
    assert lora.specs[0].args == {"rank": 2}


def test_the_core_does_not_name_the_tuner():
    assert "ytuning" not in inspect.getsource(utuning.model)
    assert "ytuning" not in inspect.getsource(utuning.tuner)
