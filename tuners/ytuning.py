"""Y-Tuning: learned label representations that read frozen features (Liu et al. 2022,
arXiv 2202.09817).

The backbone is never tuned, nor run with gradients: a small Transformer decoder, the
"Y-network", takes one learned embedding per label as its queries. Each of its layers lets the
labels attend to each other (self-attention) and to the detached features of the backbone
(cross-attention, key padding mask respected), then scores every label::

    Y_0 = E_labels W_in                                    # (L, d) label queries
    Y_k = FFN(CrossAttn(SelfAttn(Y_{k-1}), M_k))            # M_k: frozen features, projected to d
    classification  s_l   = w · Y_K[l] + b_l               # (B, L)
    labelling       s_n,l = <T_n, Y_K[l]> / sqrt(d) + b_l  # (B, N, L): token x label
    span            s_n = <T_n, Y_K[l]> / sqrt(d), l in ("start", "end")    # (B, N, 2)

Layers: ``fusion="layerwise"`` (default) gives the Y-network one decoder layer per chosen
backbone layer, bottom-up, each cross-attending to its own layer's features, so the labels see
shallow then deep features, as in the paper's multi-layer design. ``fusion="mixture"`` mixes the
chosen layers with learned softmax weights and runs ``depth`` decoder layers over the mixture.
Token scores use the features of the last chosen layer.

Label embeddings start random (normal, std 0.02) or, given ``label_names`` on a text backbone,
as the frozen model's embeddings of the names (the paper's label-name initialisation) through the
embed site's ``embed_text``. Sizes: the paper keeps the Y-network small; ``hidden=128``,
``heads=4``, FFN ``4 x hidden`` and dropout 0.1 are this implementation's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


class MultiHeadAttention(nn.Module):
    """Queries (B, L, d) attend to a memory (B, N, d_mem); ``mask`` (B, N) True for real tokens."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"Argument hidden={dim} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        # No key bias: q·b_k is the same for every key, so a softmax over keys ignores it.
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim, bias=name != "k") for name in ("q", "k", "v", "out"))

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
        self.drop = nn.Dropout(dropout)

    def forward(self, y: Tensor, memory: Tensor, mask: Tensor | None) -> Tensor:  # (B, L, d)
        h = self.norm1(y)
        y = y + self.drop(self.self_attn(h, h))
        y = y + self.drop(self.cross_attn(self.norm2(y), memory, mask))
        return y + self.drop(self.ffn(self.norm3(y)))


@register_tuner("ytuning")
class YTuning(SideTuner):
    """Y-Tuning (arXiv 2202.09817): a label-query Transformer decoder beside a frozen backbone.

    ``task``: ``classification`` -> (B, L) logits; ``labelling`` -> (B, N, L) token x label scores
    (loss: ``labelling_loss``); ``span`` -> (B, N, 2) start (``[..., 0]``) and end (``[..., 1]``)
    scores, padding at the dtype's lowest value (loss: ``span_loss``, the engine's ``qa`` task). Give ``num_labels`` or ``label_names`` (or both) for
    classification and labelling; ``span`` has its two labels.
    """

    paper = "https://arxiv.org/abs/2202.09817"

    def __init__(self, sites: Sequence[SiteSpec], *, task: str = "classification", num_labels: int | None = None,
                 label_names: Sequence[str] | None = None, hidden: int = 128, heads: int = 4, ffn: int | None = None,
                 fusion: str = "layerwise", depth: int | None = None, dropout: float = 0.1) -> None:
        super().__init__(sites)
        self.task = choice("task", task, TASKS)
        self.fusion = choice("fusion", fusion, FUSIONS)
        positive("hidden", hidden)
        positive("heads", heads)
        self.label_names = None if label_names is None else [str(n) for n in label_names]
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
        self.labels = nn.Parameter(torch.randn(num, dim) * 0.02)  # (L, D) in the backbone's embedding space
        self.label_in = nn.Linear(dim, hidden)
        # Each chosen block's features are normalised and projected to the Y-network width.
        self.memory = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden)) for _ in layers)
        if fusion == "mixture":
            self.mix = nn.Parameter(torch.zeros(len(layers)))
        self.blocks = nn.ModuleList(YLayer(hidden, heads, ffn or 4 * hidden, dropout) for _ in range(depth))
        # Its shift would add the same score to every label (classification, labelling): span only.
        self.norm = nn.LayerNorm(hidden, bias=self.task == "span")
        # Only parameters a loss can move: a bias shared by every label is invisible to a softmax
        # over labels, and one constant over tokens to a softmax over tokens (span), so neither exists.
        if self.task == "classification":
            self.score = nn.Linear(hidden, 1, bias=False)
        else:
            self.token = nn.Linear(hidden, hidden, bias=self.task == "labelling")
        if self.task != "span":
            self.bias = nn.Parameter(torch.zeros(num))  # per label

    def _num_labels(self, num_labels: int | None) -> int:
        if self.task == "span":
            if num_labels not in (None, 2) or self.label_names is not None:
                raise ConfigError("task='span' has exactly two labels (start, end); drop num_labels / label_names")
            return 2
        if num_labels is None and self.label_names is None:
            raise ConfigError(f"Tuner 'ytuning' with task={self.task!r} needs num_labels or label_names")
        if num_labels is not None and self.label_names is not None and num_labels != len(self.label_names):
            raise ConfigError(f"num_labels={num_labels} but {len(self.label_names)} label_names were given")
        num = len(self.label_names) if num_labels is None else num_labels
        positive("num_labels", num)
        return num


    @torch.no_grad()
    def on_attach(self, backbone) -> None:
        """Label-name initialisation from the frozen embeddings (text backbones)."""
        if self.label_names is None:
            return
        handle = backbone.slot("embed").handle
        embed_text = getattr(handle, "embed_text", None)
        if not callable(embed_text):
            raise ConfigError(
                f"ytuning label_names={self.label_names[:3]}...: backbone {backbone.name!r} cannot embed label "
                "names (its embed site has no embed_text); give num_labels instead"
            )
        emb = embed_text(self.label_names)  # (L, D)
        if tuple(emb.shape) != tuple(self.labels.shape):
            raise ConfigError(f"embed_text returned {tuple(emb.shape)}, expected {tuple(self.labels.shape)}")
        self.labels.copy_(emb.to(self.labels))

    def _memories(self, feats: Features) -> list[Tensor]:
        return [proj(layer_features(feats, i, self.name)) for proj, i in zip(self.memory, self.layers)]  # (B, N, d)

    def forward(self, feats: Features) -> Tensor:
        memories = self._memories(feats)
        mask = feats.mask
        b = memories[0].shape[0]
        y = self.label_in(self.labels).expand(b, -1, -1)  # (B, L, d)
        if self.fusion == "mixture":
            w = self.mix.softmax(0)
            mixed = sum(wk * m for wk, m in zip(w, memories))  # (B, N, d)
            memories = [mixed] * len(self.blocks)
        for block, memory in zip(self.blocks, memories):
            y = block(y, memory, mask)
        y = self.norm(y)  # (B, L, d)
        if self.task == "classification":
            return self.score(y).squeeze(-1) + self.bias  # (B, L)
        tokens = self.token(memories[-1])  # (B, N, d)
        scores = torch.einsum("bnd,bld->bnl", tokens, y) / math.sqrt(y.shape[-1])  # (B, N, L)
        if self.task == "labelling":
            return scores + self.bias
        if mask is not None:
            scores = scores.masked_fill(~mask[..., None], torch.finfo(scores.dtype).min)
        return scores  # (B, N, 2): start, end

    def extra_repr(self) -> str:
        return f"task={self.task!r}, layers={self.layers}, fusion={self.fusion!r}"
