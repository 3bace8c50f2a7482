"""Encoder layers of Hugging Face BERT-style models re-written with operation slots.

BERT, RoBERTa, ELECTRA and DeBERTa-v2/v3 are post-LN encoders. Their layers are re-written as
``TextLayer`` (``DebertaLayer`` for the disentangled attention), keeping the frozen submodules
``attention``, ``intermediate`` and ``output`` under their original names, so the state-dict keys
of the HF model do not change::

    x = attention.output.LayerNorm(x + attn_op(x))   # attn_op = self-attention, dense, dropout
    x = output.LayerNorm(x + mlp_op(x))              # mlp_op  = dense, act, dense, dropout

The operations end *before* the residual add and LayerNorm, so a parallel tuner's output is
added there (He et al. 2022, arXiv 2110.04366, Sec. 3). Linear sites inside them: ``attn.q``,
``attn.k``, ``attn.v`` (query/key/value), ``attn.proj`` (attention output dense), ``mlp.fc1``
(intermediate dense) and ``mlp.fc2`` (output dense).

Every operation takes ``(x, mask)``: x (B, N, D) and the padding mask (B, N) bool, True for real
tokens (prompt tokens inserted by a slot are real). Padded keys are never attended to.

``FAMILIES`` is the table of what differs between the supported families (keyed by ``model_type``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from torch import Tensor, nn

from utuning.attention import attend, merge_heads, split_heads
from utuning.handle import OpHandle
from utuning.slot import Slot

DEBERTA_REFUSAL = (
    "DeBERTa's disentangled attention scores every key by its relative position to the query "
    "(c2p/p2c terms); learned prefix keys have no position, so their attention is not defined by the "
    "frozen model (use prompt, which inserts real tokens, or a parallel adapter)"
)
#: Why DeBERTa sites offer no frozen query / key-value projections to parallel attention tuners.
DEBERTA_FEATURE_REFUSAL = {
    "query": "DeBERTa's attention adds relative-position terms (c2p/p2c) to every query-key score, so attention "
             "of its content query over learned position-free keys is not the frozen model's attention",
    "key_value": "prompt tokens projected as DeBERTa keys would have no relative position for the c2p/p2c terms",
}


def _bert_head(m: nn.Module, cls: Tensor) -> Tensor:  # (B, D) -> (B, C)
    return m.classifier(m.dropout(m.bert.pooler(cls[:, None])))


def _deberta_head(m: nn.Module, cls: Tensor) -> Tensor:
    return m.classifier(m.dropout(m.pooler(cls[:, None])))


def _classification_head(m: nn.Module, cls: Tensor) -> Tensor:  # RoBERTa / ELECTRA: dense, act, out_proj
    return m.classifier(cls[:, None])


@dataclass(frozen=True)
class Family:
    """What differs between the supported families."""

    base: type  # the encoder model, e.g. BertModel
    classifier: type  # its sequence-classification model
    layer: type  # the HF layer class that is re-written
    head: Callable[[nn.Module, Tensor], Tensor]  # (classifier model, [CLS] (B, D)) -> logits (B, C)
    head_modules: tuple[str, ...]  # attributes of the classifier model the head consists of
    deberta: bool = False
    config_fields: tuple[str, ...] = ()  # fields the family reads with getattr, absent from its config's dict


_DEBERTA_FIELDS = ("attention_head_size", "cls_dropout", "conv_act", "conv_groups", "conv_kernel_size", "embedding_size",
                   "norm_rel_ebd", "position_buckets", "share_att_key", "pooler_hidden_size")


FAMILIES: dict[str, Family] = {
    "bert": Family(tf.BertModel, tf.BertForSequenceClassification, tf.models.bert.modeling_bert.BertLayer,
                   _bert_head, ("bert.pooler", "classifier")),
    "roberta": Family(tf.RobertaModel, tf.RobertaForSequenceClassification,
                      tf.models.roberta.modeling_roberta.RobertaLayer, _classification_head, ("classifier",)),
    "electra": Family(tf.ElectraModel, tf.ElectraForSequenceClassification,
                      tf.models.electra.modeling_electra.ElectraLayer, _classification_head, ("classifier",)),
    "deberta-v2": Family(tf.DebertaV2Model, tf.DebertaV2ForSequenceClassification,
                         tf.models.deberta_v2.modeling_deberta_v2.DebertaV2Layer, _deberta_head,
                         ("pooler", "classifier"), deberta=True, config_fields=_DEBERTA_FIELDS),
}


class TextOpHandle(OpHandle):
    """A layer operation: its frozen modules, and the layer's frozen query/key/value projections.

    The models are post-LN, so an operation's input enters the projections directly (no pre-norm)."""

    def __init__(self, site: str, modules: dict[str, Any], attn_self: nn.Module) -> None:
        super().__init__(site, modules)
        self.attn_self = attn_self

    def query(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, H, N, Dh)
        return split_heads(self.attn_self.query(x), self.attn_self.num_attention_heads)

    def key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:  # (B, P, D) -> two (B, H, P, Dh)
        s = self.attn_self
        return split_heads(s.key(tokens), s.num_attention_heads), split_heads(s.value(tokens), s.num_attention_heads)

    raw_key_value = key_value  # post-LN: the projections have no pre-norm to skip

    def out_proj(self, heads: Tensor) -> Tensor:  # attn sites: (B, N, H*Dh) -> (B, N, D), W_o without bias
        return F.linear(heads, self.modules["attention"].output.dense.weight)


class TextLayer(nn.Module):
    # Every attribute the re-written forward reads, per submodule (checked at wrap time).
    READS = {"attention.self": ("query", "key", "value", "num_attention_heads", "attention_head_size", "dropout"),
             "attention.output": ("dense", "dropout", "LayerNorm"),
             "intermediate": ("dense", "intermediate_act_fn"), "output": ("dense", "dropout", "LayerNorm")}

    """A BERT / RoBERTa / ELECTRA encoder layer with operation slots."""

    def __init__(self, layer: nn.Module, slots: dict[str, Slot]) -> None:
        super().__init__()
        self.attention = layer.attention
        self.intermediate = layer.intermediate
        self.output = layer.output
        self.slots = slots  # plain dict: the slots are registered once, in the backbone adapter
        self.train(layer.training)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:  # (B, N, D), (B, N) bool
        return self.slots["block"].around(x, self._block, mask)

    def _block(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.attention.output.LayerNorm(x + self.slots["attn"].apply(x, self._attn_op, mask))
        return self.output.LayerNorm(x + self.slots["mlp"].apply(x, self._mlp_op, mask))

    def _heads(self, x: Tensor, *layers: nn.Module) -> list[Tensor]:
        """q, k, v through their linear sites (reparam tuners applied): each (B, H, N, Dh)."""
        h = self.attention.self.num_attention_heads
        return [split_heads(self.slots[f"attn.{n}"].linear(x, layer), h) for n, layer in zip("qkv", layers)]

    def _attn_op(self, x: Tensor, mask: Tensor) -> Tensor:
        s, slots = self.attention.self, self.slots
        q, k, v = self._heads(x, s.query, s.key, s.value)
        prefixes, decomposed = slots["attn"].prefixes(x.shape[0])
        drop = s.dropout.p if s.dropout.training else 0.0  # HF's own dropout module sets the mode
        o = attend(q, k, v, key_mask=mask, prefixes=prefixes, decomposed=decomposed, dropout_p=drop,
                   scale=s.attention_head_size ** -0.5)
        out = self.attention.output
        return out.dropout(slots["attn.proj"].linear(merge_heads(o), out.dense))  # (B, N, D)

    def _mlp_op(self, x: Tensor, mask: Tensor) -> Tensor:
        i, o = self.intermediate, self.output
        h = i.intermediate_act_fn(self.slots["mlp.fc1"].linear(x, i.dense))  # (B, N, D_ff)
        return o.dropout(self.slots["mlp.fc2"].linear(h, o.dense))


class DebertaLayer(TextLayer):
    """A DeBERTa-v2/v3 layer: disentangled attention (He et al. 2021, arXiv 2006.03654, Eq. 4)::

        A_ij = (q_i·k_j + q_i·k^r_{δ(i,j)} + k_j·q^r_{δ(j,i)}) / sqrt(3·Dh)    (c2p, p2c terms)

    Relative positions are those of the tokens entering the layer (inserted prompt tokens
    included). With ``share_att_key`` the position embeddings go through the query/key sites, so
    LoRA and the other reparam tuners act on both terms and merge exactly. Block 0 also holds the
    encoder's convolution layer when the model has one (DeBERTa-v2 xlarge), as HF applies it there.
    """

    READS = {**TextLayer.READS, "attention.self": (
        "query_proj", "key_proj", "value_proj", "num_attention_heads", "dropout", "pos_att_type", "relative_attention")}
    # Read only when the layer has relative attention (HF sets them only then).
    READS_RELATIVE = ("pos_ebd_size", "pos_dropout", "position_buckets", "max_relative_positions", "share_att_key")

    def __init__(self, layer: nn.Module, slots: dict[str, Slot], encoder: nn.Module, conv: nn.Module | None) -> None:
        super().__init__(layer, slots)
        # Plain lists: the encoder and its conv layer are not children (no state-dict keys twice).
        self.encoder = [encoder]
        self.conv = [conv] if conv is not None else []

    def _block(self, x: Tensor, mask: Tensor) -> Tensor:
        y = super()._block(x, mask)
        for conv in self.conv:
            y = conv(x, y, mask.to(x.dtype))  # masks padded tokens, as HF does after layer 0
        return y

    def _attn_op(self, x: Tensor, mask: Tensor) -> Tensor:
        s, slots = self.attention.self, self.slots
        q, k, v = self._heads(x, s.query_proj, s.key_proj, s.value_proj)
        factor = 1 + ("c2p" in s.pos_att_type) + ("p2c" in s.pos_att_type)
        scale = torch.sqrt(torch.tensor(q.shape[-1], dtype=torch.float) * factor).to(q.dtype)
        scores = q @ (k.transpose(-1, -2) / scale)  # (B, H, N, N)
        if s.relative_attention:
            scores = scores + self._relative_scores(q, k, scale)
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(q.dtype).min)
        probs = s.dropout(scores.softmax(dim=-1))
        out = self.attention.output
        return out.dropout(slots["attn.proj"].linear(merge_heads(probs @ v), out.dense))  # (B, N, D)

    def _relative_scores(self, q: Tensor, k: Tensor, scale: Tensor) -> Tensor:
        from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

        s, slots, enc = self.attention.self, self.slots, self.encoder[0]
        span = s.pos_ebd_size
        rel = s.pos_dropout(enc.get_rel_embedding())[: 2 * span][None]  # (1, 2S, D)
        rel_pos = build_relative_position(q, k, bucket_size=s.position_buckets, max_position=s.max_relative_positions)
        rel_pos = rel_pos[0]  # (N, N): i - j, log-bucketed
        heads, (b, _, n, _) = s.num_attention_heads, q.shape
        score = 0
        if "c2p" in s.pos_att_type:
            pos_k = slots["attn.k"].linear(rel, s.key_proj) if s.share_att_key else s.pos_key_proj(rel)
            c2p = q @ split_heads(pos_k, heads).transpose(-1, -2)  # (B, H, N, 2S)
            idx = torch.clamp(rel_pos + span, 0, 2 * span - 1).expand(b, heads, n, n)
            score = score + torch.gather(c2p, -1, idx) / scale
        if "p2c" in s.pos_att_type:
            pos_q = slots["attn.q"].linear(rel, s.query_proj) if s.share_att_key else s.pos_query_proj(rel)
            p2c = k @ split_heads(pos_q, heads).transpose(-1, -2)  # (B, H, N_k, 2S)
            idx = torch.clamp(-rel_pos + span, 0, 2 * span - 1).expand(b, heads, n, n)
            score = score + torch.gather(p2c, -1, idx).transpose(-1, -2) / scale
        return score  # (B, H, N, N)
