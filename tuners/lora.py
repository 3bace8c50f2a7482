"""LoRA: a low-rank update beside a frozen linear layer, mergeable into it; with rsLoRA scaling
and PiSSA / OLoRA initialisation."""

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
from utuning.tuners._common import AdditiveMerge, choice, positive

PART_NAMES = ("q", "k", "v")
INITS = ("default", "pissa", "olora")


def principal_pair(weight: Tensor, rank: int, init: str, scaling: float) -> tuple[Tensor, Tensor]:
    """``(A0, B0)`` with ``scaling·B0 A0`` the rank-``rank`` principal part of ``weight`` (D_out, D_in).

    PiSSA (arXiv 2404.02948): ``W = U S Vᵀ``, ``A0 = sqrt(S_r/s) V_rᵀ``, ``B0 = U_r sqrt(S_r/s)``.
    OLoRA (arXiv 2406.01775): ``W = Q R``, ``A0 = R_r``, ``B0 = Q_r`` (as HF PEFT writes both).
    """
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))  # no half-precision SVD
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:rank] / scaling)  # (r,)
        return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    q, r = torch.linalg.qr(w)
    return r[:rank].contiguous(), q[:, :rank].contiguous()


@register_tuner("lora")
class LoRA(AdditiveMerge, Tuner):
    """Low-rank adaptation (Hu et al. 2021, arXiv 2106.09685): ``y = W x + s·B A x``, ``s = alpha/rank``.

    ``B`` starts at zero. On a fused ``qkv`` site each projection gets its own rank-``rank`` pair,
    as on separate q/k/v layers, and ``parts`` picks the projections to adapt (the paper adapts
    ``["q", "v"]``); ``fused: true`` instead adapts the fused (3·D, D) matrix with one pair, as
    HF PEFT does with ``target_modules=["qkv"]`` (a third of the parameters). Elsewhere the whole
    layer is adapted. ``merge`` adds the update to the frozen weight, ``unmerge`` subtracts it.

    ``rslora: true`` scales by ``alpha/sqrt(rank)`` (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732).
    ``init: pissa`` / ``olora`` start ``A, B`` at the principal part ``(A0, B0)`` of ``W`` (PiSSA,
    arXiv 2404.02948; OLoRA, arXiv 2406.01775). The tuner owns that part: it keeps ``A0, B0`` as
    saved buffers and computes ``y = W x + s·(B A − B0 A0) x``, i.e. the residual weight
    ``W − s·B0 A0`` plus the trained pair, without rewriting the frozen weight; so it starts as
    the identity, ``merge`` folds ``s·(B A − B0 A0)`` in, and the saved state (``base_A``,
    ``base_B``) is all it takes to rebuild it on the original frozen model.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2106.09685"

    def __init__(self, site: SiteSpec, *, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 parts: Sequence[str] | None = None, fused: bool = False, rslora: bool = False,
                 init: str = "default") -> None:
        super().__init__(site)
        positive("rank", rank)
        self.init = choice("init", init, INITS)
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
        self.rank = rank
        self.rslora = bool(rslora)
        self.scaling = alpha / math.sqrt(rank) if self.rslora else alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(len(index), rank, site.dim))  # (parts, r, D_in)
        self.lora_B = nn.Parameter(torch.zeros(len(index), self.part_dim, rank))  # (parts, D_part, r)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if self.init != "default":
            if rank > min(self.part_dim, site.dim):
                raise ConfigError(f"lora init={init!r} at {site.name!r}: rank {rank} exceeds the layer's "
                                  f"{min(self.part_dim, site.dim)} principal directions")
            self.register_buffer("base_A", torch.zeros_like(self.lora_A))  # A0: (parts, r, D_in)
            self.register_buffer("base_B", torch.zeros_like(self.lora_B))  # B0: (parts, D_part, r)

    @torch.no_grad()
    def on_attach(self, op: OpHandle) -> None:
        if self.init == "default":
            return
        weight = op.linear.weight
        for j, i in enumerate(self.index):
            a0, b0 = principal_pair(weight[i * self.part_dim:(i + 1) * self.part_dim], self.rank, self.init,
                                    self.scaling)
            for t, v in ((self.lora_A[j], a0), (self.lora_B[j], b0), (self.base_A[j], a0), (self.base_B[j], b0)):
                t.copy_(v)

    def down_weight(self) -> Tensor:
        """Every pair's ``A`` as one (pairs·r, D_in) matrix (PiSSA/OLoRA: ``[A; A0]``)."""
        down = self.lora_A.flatten(0, 1)
        return down if self.init == "default" else torch.cat([down, self.base_A.flatten(0, 1)])

    def up_weight(self) -> Tensor:
        """All parts' ``B`` as one (D_out, pairs·rank) matrix, unscaled: ``B_j`` sits in the rows of
        its projection and the columns of its rank block, zeros elsewhere, so the update of every
        part is one matmul with no split, stack or permute of the output. A single pair over the
        whole layer is ``B`` itself (no copy). PiSSA/OLoRA append ``−B0``."""
        up = self._spread(self.lora_B)
        return up if self.init == "default" else torch.cat([up, self._spread(-self.base_B)], dim=1)

    def _spread(self, b: Tensor) -> Tensor:
        n, d, r = b.shape
        if n == 1 and self.split == 1:
            return b[0]
        up = b.new_zeros(self.split, d, n, r)
        for j, i in enumerate(self.index):
            up[i, :, j] = b[j]
        return up.reshape(self.split * d, n * r)

    def delta_weight(self) -> Tensor:
        """The update of the full weight, (D_out, D_in)."""
        return (self.up_weight() @ self.down_weight()) * self.scaling

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (..., D_in), y (..., D_out)
        h = F.linear(self.dropout(x), self.down_weight())  # every pair's down-projection: (..., pairs·r)
        # y + s·h @ up^T in one fused multiply-add over the flattened tokens.
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.up_weight().T,
                          alpha=self.scaling)
        return out.view(y.shape)

