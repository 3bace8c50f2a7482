"""LST: ladder side-tuning, a narrow side network beside a frozen backbone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from utuning.backbone import Features
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import SideTuner
from utuning.tuners._common import choice, positive, start_from_frozen_head
from utuning.tuners.ytuning import layer_features

POOLS = ("first", "mean")


@register_tuner("lst")
class LadderSideTuning(SideTuner):
    """Ladder side-tuning (Sung et al. 2022, arXiv 2206.06522): a side network of width
    ``d = D / reduction`` reads the frozen outputs ``f_k`` of the chosen blocks through
    down-projections and learned gates, and never sends gradients through the backbone (which
    runs once without gradients, and whose features can be cached like the bypass's):

        s_0 = 0
        s_k = T_k( μ_k · down_k(f_k) + (1 − μ_k) · s_{k−1} ),   μ_k = sigmoid(α_k / τ)
        z   = pooled + up(LN(pool(s_K))),                        logits = head(z)

    with ``T_k`` a pre-norm Transformer layer of width d (FFN 4d, GELU), ``α_k`` starting at zero
    (μ = 1/2) and temperature ``τ = 0.1`` (paper), ``up`` at zero so that at init ``z`` is the
    frozen pre-logits and the head (a copy of the frozen one when shapes agree) a linear probe.
    Paper defaults: ``reduction=8``. Not reproduced: the paper initialises ``T_k`` from a pruned
    copy of the backbone and feeds ``s_0`` from the embeddings; here the side layers start from
    PyTorch's initialisation and ``s_0 = 0`` (Features hold block outputs only).
    """

    paper = "https://arxiv.org/abs/2206.06522"

    def __init__(self, sites: Sequence[SiteSpec], *, num_classes: int, reduction: int = 8, heads: int | None = None,
                 temperature: float = 0.1, pool: str = "first", dropout: float = 0.0) -> None:
        super().__init__(sites)
        positive("num_classes", num_classes)
        positive("reduction", reduction)
        positive("temperature", temperature, 1e-6)
        self.pool = choice("pool", pool, POOLS)
        dim = self.sites[0].dim
        width = max(dim // reduction, 1)
        heads = heads or max(h for h in range(1, (self.sites[0].num_heads or 1) + 1) if width % h == 0)
        self.temperature = float(temperature)
        self.down = nn.ModuleList(nn.Linear(dim, width) for _ in self.layers)
        self.alpha = nn.Parameter(torch.zeros(len(self.layers)))  # gate logits
        self.side = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in self.layers
        )
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def on_attach(self, backbone) -> None:
        start_from_frozen_head(self.head, backbone)

    def side_feature(self, feats: Features) -> Tensor:
        """The merged feature ``z`` (B, D) before the head."""
        padding = None if feats.mask is None else ~feats.mask  # (B, N) True at padding
        gates = torch.sigmoid(self.alpha / self.temperature)
        s = None
        for k, (down, layer, i) in enumerate(zip(self.down, self.side, self.layers)):
            f = down(layer_features(feats, i, self.name))  # (B, N, d)
            s = layer(f * gates[k] if s is None else gates[k] * f + (1 - gates[k]) * s, src_key_padding_mask=padding)
        if self.pool == "first":
            pooled = s[:, 0]  # (B, d)
        elif feats.mask is None:
            pooled = s.mean(1)
        else:
            m = feats.mask[..., None].to(s.dtype)
            pooled = (s * m).sum(1) / m.sum(1).clamp_min(1)
        return feats.pooled + self.up(self.norm(pooled))

    def forward(self, feats: Features) -> Tensor:  # -> (B, num_classes)
        return self.head(self.side_feature(feats))

    def extra_repr(self) -> str:
        return f"layers={self.layers}, width={self.up.in_features}, pool={self.pool!r}"
