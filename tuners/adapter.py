"""Bottleneck adapters: sequential (Houlsby / Pfeiffer) and parallel (AdaptFormer)."""

from __future__ import annotations

from torch import Tensor, nn

from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import Bottleneck

OP_KINDS = frozenset({"attn", "mlp", "block"})


@register_tuner("adapter")
class Adapter(Tuner):
    """Sequential bottleneck adapter (Houlsby et al. 2019, arXiv 1902.00751):
    ``y = OP(x); y = y + up(act(down(y)))``. Houlsby placement: attach at ``blocks.*.attn`` and
    ``blocks.*.mlp`` (composition ``houlsby_adapter``); Pfeiffer placement (Pfeiffer et al. 2021,
    arXiv 2005.00247): ``blocks.*.mlp`` only (composition ``pfeiffer_adapter``).
    ``up`` starts at zero, so attaching it leaves the outputs unchanged.
    """

    placement = "sequential"
    site_kinds = OP_KINDS
    paper = "https://arxiv.org/abs/1902.00751"

    def __init__(self, site: SiteSpec, *, hidden: int = 64, act: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__(site)
        self.bottleneck = Bottleneck(site.out_dim, hidden, act=act, dropout=dropout)

    def forward(self, y: Tensor, op: OpHandle) -> Tensor:  # (B, N, D) -> (B, N, D)
        return self.bottleneck(y)


@register_tuner("parallel_adapter")
class ParallelAdapter(Tuner):
    """Parallel adapter / AdaptFormer (He et al. 2022, arXiv 2110.04366; Chen et al. 2022,
    arXiv 2205.13535): ``y = OP(x) + s·up(act(down(x)))`` with a fixed scale ``s`` (0.1 in
    AdaptFormer) and an optional LayerNorm on the adapter input.
    """

    placement = "parallel"
    site_kinds = OP_KINDS
    paper = "https://arxiv.org/abs/2205.13535"

    def __init__(self, site: SiteSpec, *, hidden: int = 64, scale: float = 0.1, act: str = "relu",
                 dropout: float = 0.1, layernorm: bool = False) -> None:
        super().__init__(site)
        self.norm = nn.LayerNorm(site.dim) if layernorm else nn.Identity()
        self.bottleneck = Bottleneck(site.dim, hidden, site.out_dim, act=act, dropout=dropout)
        self.scale = float(scale)

    def forward(self, x: Tensor, op: OpHandle) -> Tensor:  # (B, N, D) -> (B, N, D)
        return self.scale * self.bottleneck(self.norm(x))
