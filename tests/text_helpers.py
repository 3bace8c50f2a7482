"""Tiny offline Hugging Face text encoders (BERT, RoBERTa, ELECTRA, DeBERTa-v2/v3) for the tests."""

from __future__ import annotations

import copy

import torch
import transformers as tf
from torch import nn

from utuning.backbones.hf_text import TINY, HFTextBackbone

_DEBERTA = {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "type_vocab_size": 2, "pooler_hidden_size": 32}
#: name -> (model type, config overrides). deberta_v3: shared attention keys, log buckets, normed
#: relative embeddings; deberta_v2: separate position projections and the conv layer after block 0.
CONFIGS: dict[str, tuple[str, dict]] = {
    "bert": ("bert", {}),
    "roberta": ("roberta", {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}),
    "electra": ("electra", {"embedding_size": 16}),
    "deberta_v3": ("deberta-v2", {**_DEBERTA, "position_buckets": 8, "share_att_key": True, "norm_rel_ebd": "layer_norm"}),
    "deberta_v2": ("deberta-v2", {**_DEBERTA, "share_att_key": False, "max_relative_positions": 16, "conv_kernel_size": 3}),
}
FAMILIES = list(CONFIGS)
BERT_LIKE = ["bert", "roberta", "electra"]


def tiny_text_model(family: str, num_classes: int = 3, seed: int = 0) -> nn.Module:
    """A 2-layer, width-32 ``*ForSequenceClassification`` model built offline from a config."""
    model_type, extra = CONFIGS[family]
    config = tf.AutoConfig.for_model(model_type, num_labels=num_classes, **TINY)
    for key, value in extra.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return tf.AutoModelForSequenceClassification.from_config(config).eval()


def text_backbone(family: str, **kwargs) -> HFTextBackbone:
    return HFTextBackbone(tiny_text_model(family, **kwargs))


def pair(family: str) -> tuple[nn.Module, callable]:
    """An untouched HF model and a factory of backbones wrapping identical copies of it."""
    hf = tiny_text_model(family)
    return hf, lambda: HFTextBackbone(copy.deepcopy(hf))


def padded_inputs(backbone: HFTextBackbone, batch_size: int = 3, seq_len: int = 8) -> dict:
    """``example_inputs``: every second row has 3 padding tokens."""
    inputs = backbone.example_inputs(batch_size, seq_len)
    assert (inputs["attention_mask"] == 0).any()
    return inputs


def extra_padding(inputs: dict, pad_token_id: int, extra: int = 4) -> dict:
    """The same batch with ``extra`` padding columns appended."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b = ids.shape[0]
    return {
        "input_ids": torch.cat([ids, ids.new_full((b, extra), pad_token_id)], dim=1),
        "attention_mask": torch.cat([mask, mask.new_zeros(b, extra)], dim=1),
        "token_type_ids": torch.cat([inputs["token_type_ids"], ids.new_zeros(b, extra)], dim=1),
    }
