"""LoRA: a low-rank update beside a frozen linear layer, mergeable into it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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

    ``B`` starts at zero. On a fused ``qkv`` site, ``parts`` picks the projections to adapt
    (the paper adapts ``["q", "v"]``); elsewhere the whole layer is adapted. ``merge`` adds
    ``(alpha/rank)·B A`` to the frozen weight, ``unmerge`` subtracts it.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2106.09685"

    def __init__(self, site: SiteSpec, *, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 parts: Sequence[str] | None = None) -> None:
        super().__init__(site)
        positive("rank", rank)
        split = site.info.get("split", 1)
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

    def delta_weight(self) -> Tensor:
        """The update of the full weight, (D_out, D_in)."""
        blocks = [torch.zeros(self.part_dim, self.lora_A.shape[-1], dtype=self.lora_A.dtype, device=self.lora_A.device)
                  for _ in range(self.split)]
        for j, i in enumerate(self.index):
            blocks[i] = self.lora_B[j] @ self.lora_A[j]
        return torch.cat(blocks, dim=0) * self.scaling

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (..., D_in), y (..., D_out)
        n, r = self.lora_A.shape[:2]
        h = self.dropout(x) @ self.lora_A.reshape(n * r, -1).T  # one matmul for all parts: (..., n*r)
        delta = torch.einsum("...nr,ndr->...nd", h.unflatten(-1, (n, r)), self.lora_B * self.scaling)  # (..., n, D_part)
        if n == self.split:  # every part adapted (or an unsplit layer): no zero blocks to build
            return y + delta.flatten(-2)
        ys = list(y.unflatten(-1, (self.split, self.part_dim)).unbind(-2))  # split fused q, k, v outputs
        for j, i in enumerate(self.index):
            ys[i] = ys[i] + delta[..., j, :]
        return torch.stack(ys, dim=-2).flatten(-2)

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        op.linear.weight += self.delta_weight().to(op.linear.weight.dtype)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        op.linear.weight -= self.delta_weight().to(op.linear.weight.dtype)
