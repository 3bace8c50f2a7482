"""Y-Tuning: learned label representations that read frozen features (Liu et al. 2022,
arXiv 2202.09817).

The backbone is never tuned, nor run with gradients: a small Transformer decoder, the
"Y-network", takes one learned embedding per label as its queries. Each of its layers lets the
labels attend to each other (self-attention) and to the detached features of the backbone
(cross-attention, key padding mask respected); each label's output is then matched with the
input's features::

    Y_0 = E_labels W_in                                    # (L, d) label queries, no shared bias
    Y_k = Y_{k-1} + FFN(CrossAttn(SelfAttn(Y_{k-1}), M_k))  # M_k: frozen features projected to d
    classification  s_l   = <Y_K[l], p> / sqrt(d) + b_l    # p = LN(BN(sum_k mean_n M_k[n]))  (B, L)
    labelling       s_n,l = <T_n, Y_K[l]> / sqrt(d) + b_l  # (B, N, L): token x label
    span            s_n = <T_n, Y_K[l]> / sqrt(d), l in ("start", "end")    # (B, N, 2)

Initialisation (why the Y-network learns from the first step): with near-identical label
queries (small random labels under a shared input bias, the same after each LayerNorm), every
label attends to the features the same way and reads the same thing, so the scores differ only
by an input-independent prior: training sits on a symmetric saddle at loss ln L until the
symmetry breaks by chance (hundreds of steps; dropout keeps it from breaking). Here the labels
start orthonormal (or, from names, as centred and normalised name embeddings), ``W_in`` has no
bias, the output projections of the attention and FFN branches start at zero (so ``Y_K`` starts
as the well-separated ``Y_0``), and the classification score compares each label with the
pooled projected features ``p``: at step one the model is a linear probe of every chosen
block's pooled features with one distinct weight vector per label, and the cross-attention
branches then make each label's representation depend on the input (the paper's method).

Layers: ``fusion="layerwise"`` (default) gives the Y-network one decoder layer per chosen
backbone layer, bottom-up, each cross-attending to its own layer's features, as in the paper's
multi-layer design. ``fusion="mixture"`` mixes the chosen layers with learned softmax weights and
runs ``depth`` decoder layers over the mixture. Token scores use the last chosen layer.

Labels: ``num_labels`` / ``label_names`` default to the data's (``from_data``, filled by
``utuning.tune(..., data=...)``). ``name_init``: None (default) initialises from the frozen
model's embeddings of the names (the paper's label-name initialisation, through the embed
site's ``embed_text``) when the backbone can embed text and the names are not bare numbers;
True requires it; False keeps the orthonormal start. Sizes: ``hidden=128``, ``heads=4``, FFN
``4 x hidden`` and dropout 0.1 are this implementation's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from utuning.attention import attend, merge_heads
from utuning.backbone import Features
from utuning.errors import ConfigError
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import SideTuner
from utuning.tuners._common import choice, positive

TASKS = ("classification", "labelling", "span")
FUSIONS = ("layerwise", "mixture")


def layer_features(feats: Features, layer: int, tuner: str) -> Tensor:
    if layer not in feats.layers:
        raise ConfigError(
            f"Side tuner {tuner!r} needs the features of block {layer}, but the features hold blocks "
            f"{sorted(feats.layers)}; compute (or cache) them with layers={layer!r} included"
        )
    return feats.layers[layer]


def labelling_loss(scores: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross entropy of token x label scores (B, N, L) against labels (B, N); padding and
    sub-word continuations carry ``ignore_index``."""
    return F.cross_entropy(scores.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index)


def span_loss(logits: Tensor, positions: Tensor, ignore_index: int = -100) -> Tensor:
    """Extractive QA loss: the mean of the start and end cross entropies. ``logits`` (B, N, 2)
    with start scores at ``[..., 0]`` and end scores at ``[..., 1]``; ``positions`` (B, 2) long
    ``[start, end]`` token indices (the engine's ``qa`` task and ``utuning.data`` labels)."""
    start, end = logits.float().unbind(-1)  # two (B, N)
    positions = positions.long()
    return (F.cross_entropy(start, positions[:, 0], ignore_index=ignore_index)
            + F.cross_entropy(end, positions[:, 1], ignore_index=ignore_index)) / 2


def separated_rows(rows: Tensor) -> Tensor:
    """Rows (L, D) centred over labels and scaled to norm sqrt(D): what label embeddings share
    (e.g. the common part of name embeddings) cannot make the labels read the same thing."""
    rows = rows - rows.mean(0, keepdim=True) if rows.shape[0] > 1 else rows
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(rows.shape[1])


class MultiHeadAttention(nn.Module):
    """Queries (B, L, d) attend to a memory (B, N, d_mem); ``mask`` (B, N) True for real tokens."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"Argument hidden={dim} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        # No key bias: q·b_k is the same for every key, so a softmax over keys ignores it.
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim, bias=name != "k") for name in ("q", "k", "v", "out"))
        nn.init.zeros_(self.out.weight)  # the branch starts at zero: Y_K starts as Y_0
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None = None) -> Tensor:
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.heads)
        k = rearrange(self.k(memory), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.v(memory), "b n (h d) -> b h n d", h=self.heads)
        o = attend(q, k, v, key_mask=mask, dropout_p=self.dropout if self.training else 0.0)  # (B, H, L, Dh)
        return self.out(merge_heads(o))


class YLayer(nn.Module):
    """One pre-norm decoder layer: label self-attention, cross-attention to features, FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, heads, dropout)
        self.cross_attn = MultiHeadAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        nn.init.zeros_(self.ffn[-1].weight)
        nn.init.zeros_(self.ffn[-1].bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, y: Tensor, memory: Tensor, mask: Tensor | None) -> Tensor:  # (B, L, d)
        h = self.norm1(y)
        y = y + self.drop(self.self_attn(h, h))
        y = y + self.drop(self.cross_attn(self.norm2(y), memory, mask))
        return y + self.drop(self.ffn(self.norm3(y)))


def _pool(memory: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over real tokens: (B, N, d) -> (B, d)."""
    if mask is None:
        return memory.mean(1)
    w = mask.to(memory.dtype)[..., None]  # (B, N, 1)
    return (memory * w).sum(1) / w.sum(1).clamp_min(1)


@register_tuner("ytuning")
class YTuning(SideTuner):
    """Y-Tuning (arXiv 2202.09817): a label-query Transformer decoder beside a frozen backbone.

    ``task``: ``classification`` -> (B, L) logits; ``labelling`` -> (B, N, L) token x label scores
    (loss: ``labelling_loss``); ``span`` -> (B, N, 2) start (``[..., 0]``) and end (``[..., 1]``)
    scores, padding at the dtype's lowest value (loss: ``span_loss``, the engine's ``qa`` task).
    Classification and labelling need ``num_labels`` or ``label_names`` (from the data by default);
    ``span`` has its two labels.
    """

    paper = "https://arxiv.org/abs/2202.09817"
    from_data: ClassVar[Mapping[str, str]] = {"num_labels": "num_classes", "label_names": "label_names"}

    def __init__(self, sites: Sequence[SiteSpec], *, task: str = "classification", num_labels: int | None = None,
                 label_names: Sequence[str] | None = None, name_init: bool | None = None, hidden: int = 128,
                 heads: int = 4, ffn: int | None = None, fusion: str = "layerwise", depth: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__(sites)
        self.task = choice("task", task, TASKS)
        self.fusion = choice("fusion", fusion, FUSIONS)
        positive("hidden", hidden)
        positive("heads", heads)
        self.label_names = None if label_names is None else [str(n) for n in label_names]
        self.name_init = name_init
        num = self._num_labels(num_labels)
        layers = self.layers
        if fusion == "layerwise" and depth not in (None, len(layers)):
            raise ConfigError(
                f"Argument depth={depth!r}: fusion='layerwise' has one decoder layer per chosen block "
                f"({len(layers)}); leave depth unset or use fusion='mixture'"
            )
        depth = len(layers) if fusion == "layerwise" else (2 if depth is None else depth)
        positive("depth", depth)
        dim = sites[0].dim
        labels = torch.empty(num, dim)  # (L, D) in the backbone's embedding space
        nn.init.orthogonal_(labels) if num <= dim else nn.init.normal_(labels)
        self.labels = nn.Parameter(separated_rows(labels) if num > 1 else labels * math.sqrt(dim))
        self.label_in = nn.Linear(dim, hidden, bias=False)  # a shared bias would make the labels alike
        # Each chosen block's features are normalised and projected to the Y-network width (per block:
        # the stages of a hierarchical backbone differ in width).
        widths = {s.layer: s.dim for s in sites}
        self.memory = nn.ModuleList(nn.Sequential(nn.LayerNorm(widths[i]), nn.Linear(widths[i], hidden)) for i in layers)
        if fusion == "mixture":
            self.mix = nn.Parameter(torch.zeros(len(layers)))
        self.blocks = nn.ModuleList(YLayer(hidden, heads, ffn or 4 * hidden, dropout) for _ in range(depth))
        # Its shift would add the same score to every label (classification, labelling): span only.
        self.norm = nn.LayerNorm(hidden, bias=self.task == "span")
        if self.task != "classification":
            self.token = nn.Linear(hidden, hidden, bias=self.task == "labelling")
        if self.task != "span":
            self.bias = nn.Parameter(torch.zeros(num))  # per label
        if self.task == "classification":
            self.register_buffer("pool_mean", torch.zeros(hidden))
            self.register_buffer("pool_var", torch.ones(hidden))

    @classmethod
    def args_from_data(cls, args: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        """``span`` has its own two labels; names that are bare numbers are no label names."""
        if args.get("task") == "span":
            return {}
        out = super().args_from_data(args, data)
        names = out.get("label_names")
        if names is not None and all(str(n).lstrip("-").isdigit() for n in names) and "label_names" not in args:
            out.pop("label_names")
            out.setdefault("num_labels", len(names))
        return out

    def _num_labels(self, num_labels: int | None) -> int:
        if self.task == "span":
            if num_labels not in (None, 2) or self.label_names is not None:
                raise ConfigError("task='span' has exactly two labels (start, end); drop num_labels / label_names")
            return 2
        if num_labels is None and self.label_names is None:
            raise ConfigError(f"Tuner 'ytuning' with task={self.task!r} needs num_labels or label_names "
                              "(or data that knows its labels: utuning.tune(..., data=...))")
        if num_labels is not None and self.label_names is not None and num_labels != len(self.label_names):
            raise ConfigError(f"num_labels={num_labels} but {len(self.label_names)} label_names were given")
        num = len(self.label_names) if num_labels is None else num_labels
        positive("num_labels", num)
        return num

    @torch.no_grad()
    def on_attach(self, backbone) -> None:
        """Label-name initialisation from the frozen embeddings (text backbones), centred and
        normalised like the orthonormal start (``separated_rows``)."""
        if self.label_names is None or self.name_init is False:
            return
        embed_text = getattr(backbone.slot("embed").handle, "embed_text", None)
        numeric = all(n.lstrip("-").isdigit() for n in self.label_names)
        if self.name_init is None and (not callable(embed_text) or numeric):
            return
        if not callable(embed_text):
            raise ConfigError(
                f"ytuning name_init=True with label_names={self.label_names[:3]}...: backbone {backbone.name!r} "
                "cannot embed label names (its embed site has no embed_text); set name_init: false"
            )
        emb = embed_text(self.label_names)  # (L, D)
        if tuple(emb.shape) != tuple(self.labels.shape):
            raise ConfigError(f"embed_text returned {tuple(emb.shape)}, expected {tuple(self.labels.shape)}")
        self.labels.copy_(separated_rows(emb.float()).to(self.labels))

    def _memories(self, feats: Features) -> list[Tensor]:
        return [proj(layer_features(feats, i, self.name)) for proj, i in zip(self.memory, self.layers)]  # (B, N, d)

    def forward(self, feats: Features) -> Tensor:
        memories = self._memories(feats)
        mask = feats.mask
        b = memories[0].shape[0]
        y = self.label_in(self.labels).expand(b, -1, -1)  # (B, L, d)
        if self.fusion == "mixture":
            w = self.mix.softmax(0)
            memories = [sum(wk * m for wk, m in zip(w, memories))] * len(self.blocks)  # (B, N, d) each
        for block, memory in zip(self.blocks, memories):
            y = block(y, memory, mask)
        y = self.norm(y)  # (B, L, d)
        scale = 1 / math.sqrt(y.shape[-1])
        if self.task == "classification":
            pooled = sum(_pool(m, mask) for m in (memories[:1] if self.fusion == "mixture" else memories))  # (B, d)
            # Standardised over samples (running statistics at evaluation), as a linear probe's inputs
            # are: what every sample shares (large in real features) would otherwise drown the classes.
            pooled = F.batch_norm(pooled, self.pool_mean, self.pool_var, training=self.training and b > 1)
            pooled = F.layer_norm(pooled, pooled.shape[-1:])  # (B, d), norm sqrt(d): logits start O(1)
            return torch.einsum("bd,bld->bl", pooled, y) * scale + self.bias  # (B, L)
        tokens = self.token(memories[-1])  # (B, N, d)
        scores = torch.einsum("bnd,bld->bnl", tokens, y) * scale  # (B, N, L)
        if self.task == "labelling":
            return scores + self.bias
        if mask is not None:
            scores = scores.masked_fill(~mask[..., None], torch.finfo(scores.dtype).min)
        return scores  # (B, N, 2): start, end

    def extra_repr(self) -> str:
        return f"task={self.task!r}, layers={self.layers}, fusion={self.fusion!r}"
