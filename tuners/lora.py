"""LoRA: a low-rank update beside a frozen linear layer, mergeable into it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.errors import ConfigError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import positive

PART_NAMES = ("q", "k", "v")


@register_tuner("lora")
class LoRA(Tuner):
    """Low-rank adaptation (Hu et al. 2021, arXiv 2106.09685): ``y = W x + (alpha/rank)·B A x``.

    ``B`` starts at zero. On a fused ``qkv`` site each projection gets its own rank-``rank`` pair,
    as on separate q/k/v layers, and ``parts`` picks the projections to adapt (the paper adapts
    ``["q", "v"]``); ``fused: true`` instead adapts the fused (3·D, D) matrix with one pair, as
    HF PEFT does with ``target_modules=["qkv"]`` (a third of the parameters). Elsewhere the whole
    layer is adapted. ``merge`` adds ``(alpha/rank)·B A`` to the frozen weight, ``unmerge``
    subtracts it.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2106.09685"

    def __init__(self, site: SiteSpec, *, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 parts: Sequence[str] | None = None, fused: bool = False) -> None:
        super().__init__(site)
        positive("rank", rank)
        split = site.info.get("split", 1)
        if fused and parts is not None:
            raise ConfigError(f"lora at {site.name!r}: 'fused: true' adapts the whole fused matrix; drop 'parts' "
                              "or set 'fused: false'")
        if fused:
            split = 1
        if parts is None:
            index = list(range(split))
        elif split != 3:
            raise ConfigError(f"lora 'parts' applies to fused qkv sites; {site.name!r} is not one")
        else:
            bad = [p for p in parts if p not in PART_NAMES]
            if bad or not parts:
                raise ConfigError(f"lora parts {list(parts)!r} must be a non-empty subset of {list(PART_NAMES)}")
            index = sorted(PART_NAMES.index(p) for p in parts)
        self.index = index
        self.part_dim = site.out_dim // split
        self.split = split
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(len(index), rank, site.dim))  # (parts, r, D_in)
        self.lora_B = nn.Parameter(torch.zeros(len(index), self.part_dim, rank))  # (parts, D_part, r)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def up_weight(self) -> Tensor:
        """All parts' ``B`` as one (D_out, parts·rank) matrix, unscaled: ``B_j`` sits in the rows of
        its projection and the columns of its rank block, zeros elsewhere, so the update of every
        part is one matmul with no split, stack or permute of the output. A single pair over the
        whole layer is ``B`` itself (no copy)."""
        n, d, r = self.lora_B.shape
        if n == 1 and self.split == 1:
            return self.lora_B[0]
        up = self.lora_B.new_zeros(self.split, d, n, r)
        for j, i in enumerate(self.index):
            up[i, :, j] = self.lora_B[j]
        return up.reshape(self.split * d, n * r)

    def delta_weight(self) -> Tensor:
        """The update of the full weight, (D_out, D_in)."""
        return (self.up_weight() @ self.lora_A.flatten(0, 1)) * self.scaling

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (..., D_in), y (..., D_out)
        h = F.linear(self.dropout(x), self.lora_A.flatten(0, 1))  # every part's down-projection: (..., parts·r)
        # y + (alpha/rank)·h @ up^T in one fused multiply-add over the flattened tokens.
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.up_weight().T,
                          alpha=self.scaling)
        return out.view(y.shape)

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        op.linear.weight += self.delta_weight().to(op.linear.weight.dtype)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        op.linear.weight -= self.delta_weight().to(op.linear.weight.dtype)
