"""LoHa: a Hadamard product of two low-rank updates beside a frozen linear layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import AdditiveMerge, positive


@register_tuner("loha")
class LoHa(AdditiveMerge, Tuner):
    """Low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2022, arXiv 2108.06098; LyCORIS,
    Yeh et al. 2024, arXiv 2309.14859):

        y = W x + ΔW x,   ΔW = (alpha/rank)·(W1a W1b) ⊙ (W2a W2b)

    ``W1a, W2a`` (D_out, r), ``W1b, W2b`` (r, D_in): rank up to r² for 4·r·(D_in+D_out)/2
    parameters. ``W2b`` starts at zero (identity at init), the others Kaiming-uniform, as in
    LyCORIS and HF PEFT (defaults rank 8, alpha 8). The whole layer is adapted (a fused ``qkv``
    as one matrix). ``merge`` adds ``ΔW`` to the frozen weight, ``unmerge`` subtracts it.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2108.06098"

    def __init__(self, site: SiteSpec, *, rank: int = 8, alpha: float = 8.0) -> None:
        super().__init__(site)
        positive("rank", rank)
        self.rank, self.scaling = rank, alpha / rank
        self.w1_a = nn.Parameter(torch.empty(site.out_dim, rank))  # (D_out, r)
        self.w1_b = nn.Parameter(torch.empty(rank, site.dim))  # (r, D_in)
        self.w2_a = nn.Parameter(torch.empty(site.out_dim, rank))  # (D_out, r)
        self.w2_b = nn.Parameter(torch.zeros(rank, site.dim))  # (r, D_in)
        for w in (self.w1_a, self.w1_b, self.w2_a):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def delta_weight(self) -> Tensor:  # (D_out, D_in)
        return (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b) * self.scaling

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (..., D_in), y (..., D_out)
        return y + F.linear(x, self.delta_weight().to(x.dtype))

