"""LoKr: a Kronecker product of two small factors beside a frozen linear layer."""

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


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)``, ``m <= n``, ``m·n = dimension``, ``m`` the divisor nearest ``factor`` (-1: the
    square root) from below: LyCORIS's split of a width, so factor shapes match its checkpoints."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@register_tuner("lokr")
class LoKr(AdditiveMerge, Tuner):
    """Low-rank Kronecker product (LyCORIS, Yeh et al. 2024, arXiv 2309.14859; KronA, arXiv 2212.10650):

        y = W x + ΔW x,   ΔW = (alpha/rank)·(W1 ⊗ W2)

    With ``D_out = a·b`` and ``D_in = c·d`` split by ``factorization`` (``decompose_factor``),
    ``W1`` is (a, c) and ``W2`` (b, d). ``W2`` is low-rank, ``W2a W2b`` with rank ``rank``, when
    ``rank < max(b, d)/2``; ``W1`` too when ``decompose_both`` and ``rank < max(a, c)/2`` (the
    rules of LyCORIS and HF PEFT, so shapes match their checkpoints). ``W1`` (or ``W1a``) starts
    at zero: identity at init. Mergeable.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2309.14859"

    def __init__(self, site: SiteSpec, *, rank: int = 8, alpha: float = 8.0, decompose_both: bool = False,
                 decompose_factor: int = -1) -> None:
        super().__init__(site)
        positive("rank", rank)
        self.rank, self.scaling = rank, alpha / rank
        self.decompose_both, self.decompose_factor = bool(decompose_both), decompose_factor
        (a, b), (c, d) = factorization(site.out_dim, decompose_factor), factorization(site.dim, decompose_factor)
        if decompose_both and rank < max(a, c) / 2:
            self.w1_a = nn.Parameter(torch.zeros(a, rank))  # (a, r)
            self.w1_b = nn.Parameter(torch.empty(rank, c))  # (r, c)
            nn.init.kaiming_uniform_(self.w1_b, a=math.sqrt(5))
        else:
            self.w1 = nn.Parameter(torch.zeros(a, c))
        if rank < max(b, d) / 2:
            self.w2_a = nn.Parameter(torch.empty(b, rank))  # (b, r)
            self.w2_b = nn.Parameter(torch.empty(rank, d))  # (r, d)
            factors = (self.w2_a, self.w2_b)
        else:
            self.w2 = nn.Parameter(torch.empty(b, d))
            factors = (self.w2,)
        for w in factors:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def factor(self, i: int) -> Tensor:
        full = getattr(self, f"w{i}", None)
        return full if full is not None else getattr(self, f"w{i}_a") @ getattr(self, f"w{i}_b")

    def delta_weight(self) -> Tensor:  # (D_out, D_in)
        return torch.kron(self.factor(1), self.factor(2)) * self.scaling

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (..., D_in), y (..., D_out)
        return y + F.linear(x, self.delta_weight().to(x.dtype))

