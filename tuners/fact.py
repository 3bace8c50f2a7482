"""FacT: the weight updates of every layer as one factorised tensor, factors shared across layers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from utuning.errors import ConfigError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import AdditiveMerge, choice, positive

FORMS = ("tt", "tk")


class FacTFactors(nn.Module):
    """Factors shared by every site: ``u`` (r, D) and ``v`` (D, r) (zero: the identity); in the
    Tucker form also the core ``core`` (r, r, r) and ``p`` (r, chunks), one column per D x D chunk
    of every site (``offsets[site]`` is a site's first column)."""

    def __init__(self, form: str, rank: int, width: int, chunks: dict[str, int]) -> None:
        super().__init__()
        self.width = width
        self.u = nn.Parameter(torch.empty(rank, width))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))  # FacT's FacTu: nn.Linear(D, r) default init
        self.v = nn.Parameter(torch.zeros(width, rank))
        self.offsets: dict[str, int] = {}
        total = 0
        for site, n in chunks.items():
            self.offsets[site], total = total, total + n
        if form == "tk":
            self.core = nn.Parameter(torch.empty(rank, rank, rank))
            self.p = nn.Parameter(torch.empty(rank, sum(chunks.values())))
            nn.init.xavier_uniform_(self.core)
            nn.init.xavier_uniform_(self.p)


@register_tuner("fact")
class FacT(AdditiveMerge, Tuner):
    """Factor-tuning (Jie & Deng 2023, arXiv 2212.03145). The updates of all adapted D x D weight
    chunks (a ViT layer has 12: q, k, v, proj, 4 of fc1, 4 of fc2) form one tensor, factorised
    with ``U`` (D->r) and ``V`` (r->D) **shared across layers** (``spec`` state), so a chunk's update
    is ``ΔW = s · V M U`` with a small r x r middle factor ``M``:

    * ``form="tt"`` (tensor train): each site trains its own middle factors (its block matrix
      ``K``, (b·r, a·r) for a (b·D, a·D) layer: FacT's per-layer ``FacTs``);
    * ``form="tk"`` (Tucker): ``M_j = C ×₃ p_j`` from a shared core ``C`` (r, r, r) and one shared
      column ``p_j`` per chunk.

    ``y = W x + s · (I ⊗ V) K (I ⊗ U) x``, with dropout after ``K`` (FacT's code, 0.1). ``V`` starts
    at zero (identity). Widths must be multiples of ``D``, the greatest common divisor of the
    sites' widths (the model width). Defaults from the paper's code: ``rank=8`` (TT; the paper
    uses 32 for TK), ``scale=1`` (searched per dataset in the paper). Mergeable.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2212.03145"

    def __init__(self, site: SiteSpec, *, form: str = "tt", rank: int = 8, scale: float = 1.0,
                 dropout: float = 0.1) -> None:
        super().__init__(site)
        positive("rank", rank)
        self.form = choice("form", form, FORMS)
        self.rank, self.scale = rank, float(scale)
        self.dropout = nn.Dropout(dropout)
        self._blocks: tuple[int, int] | None = None
        if self.form == "tt":
            self.core = nn.Parameter(torch.empty(rank, rank))  # resized in bind_shared: (b·r, a·r)

    @classmethod
    def shared_state(cls, sites: Sequence[SiteSpec], args: Mapping[str, Any]) -> nn.Module:
        rank = args.get("rank", 8)
        form = choice("form", args.get("form", "tt"), FORMS)
        positive("rank", rank)
        width = math.gcd(*[d for s in sites for d in (s.dim, s.out_dim)])
        if width < rank:
            raise ConfigError(f"fact: the sites' common width {width} (gcd of their widths) is below rank={rank}; "
                              "attach it to layers of one model width")
        return FacTFactors(form, rank, width, {s.name: (s.dim // width) * (s.out_dim // width) for s in sites})

    def bind_shared(self, shared: nn.Module) -> None:
        super().bind_shared(shared)
        a, b = self.site.dim // shared.width, self.site.out_dim // shared.width
        self._blocks = (a, b)
        if self.form == "tt":
            core = torch.empty(b * self.rank, a * self.rank)
            nn.init.kaiming_uniform_(core, a=math.sqrt(5))  # FacT's FacTs: nn.Linear default init
            self.core = nn.Parameter(core)

    def middle(self) -> Tensor:
        """This site's block matrix ``K`` (b·r, a·r) of r x r middle factors."""
        if self.form == "tt":
            return self.core
        a, b = self._blocks
        f, r = self.shared, self.rank
        start = f.offsets[self.site.name]
        m = torch.einsum("xyk,kj->jxy", f.core, f.p[:, start : start + a * b])  # (a·b, r_in, r_out)
        return m.reshape(b, a, r, r).permute(0, 3, 1, 2).reshape(b * r, a * r)

    def delta_weight(self) -> Tensor:
        a, b = self._blocks
        f, r = self.shared, self.rank
        k = self.middle().reshape(b, r, a, r)
        d = f.width
        return self.scale * torch.einsum("dy,oyix,xe->odie", f.v, k, f.u).reshape(b * d, a * d)

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (..., a·D), y (..., b·D)
        a, b = self._blocks
        f = self.shared
        h = (x.unflatten(-1, (a, f.width)) @ f.u.T).flatten(-2)  # (..., a·r)
        h = self.dropout(h @ self.middle().T)  # (..., b·r)
        return y + self.scale * (h.unflatten(-1, (b, self.rank)) @ f.v.T).flatten(-2)  # (..., b·D)

