"""LoReFT: a low-rank edit of hidden states at chosen positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from utuning.errors import ConfigError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import positive


@register_tuner("loreft")
class LoReFT(Tuner):
    """Low-rank linear subspace representation fine-tuning (Wu et al. 2024, arXiv 2404.03592,
    Eq. 2): at the chosen positions the hidden state ``h`` (an operation's output, e.g. a block's,
    the residual stream) becomes

        Φ(h) = h + Rᵀ (W h + b − R h)

    with ``R`` (r, D) of orthonormal rows (here the Q factor of a free matrix, so it stays
    orthonormal while trained), ``W`` (r, D) and ``b`` (r) learned. The edit moves ``h`` only
    inside R's row space, where it sets ``R Φ(h) = W h + b``. Placement ``sequential`` (on
    ``blocks.{i}``: the residual stream after layer i). Positions: the ``first`` and the ``last``
    REAL tokens of each row (ReFT's "f+l"): the tuner takes the site's padding mask
    (``takes_mask``), so padding on either side is never edited and a row with fewer than
    ``first + last`` real tokens has each of them edited once. Prompt tokens inserted at the same
    site count as real tokens; without a mask (vision) every token is real; a feature map
    (B, H, W, D) (ConvNeXt) is read in raster order. Generating with a decoder's KV cache, the
    positions are the prompt's (chosen in the first chunk, as pyreft): generated tokens are never
    edited (the decoder passes a mask with no input-sequence token for later chunks). Paper defaults: ``rank=4``, ``first=1``, ``last=1`` (the paper tunes f, l per task); W
    has ``nn.Linear``'s initialisation, so the edit is not the identity at init (nor in the paper).
    """

    placement = "sequential"
    takes_mask = True
    site_kinds = frozenset({"block", "attn", "mlp"})
    paper = "https://arxiv.org/abs/2404.03592"

    def __init__(self, site: SiteSpec, *, rank: int = 4, first: int = 1, last: int = 1, dropout: float = 0.0) -> None:
        super().__init__(site)
        positive("rank", rank)
        positive("first", first, 0)
        positive("last", last, 0)
        if rank > site.out_dim or first + last == 0:
            raise ConfigError(f"loreft at {site.name!r}: needs rank <= {site.out_dim} (got {rank}) and at least one "
                              f"position (first={first}, last={last})")
        self.first, self.last = int(first), int(last)
        self.basis = nn.Parameter(torch.empty(site.out_dim, rank))  # R = Q(basis)ᵀ
        nn.init.orthogonal_(self.basis)
        self.source = nn.Linear(site.out_dim, rank)  # W, b
        self.dropout = nn.Dropout(dropout)

    def rotation(self) -> Tensor:
        """``R`` (r, D) with orthonormal rows."""
        return torch.linalg.qr(self.basis)[0].T

    def edit(self, h: Tensor) -> Tensor:  # (..., D) -> (..., D): Φ(h) − h
        r = self.rotation()
        return self.dropout((self.source(h) - h @ r.T) @ r)

    def chosen(self, mask: Tensor) -> Tensor:  # (B, N) bool, True at real tokens -> (B, N) bool
        """The positions edited: each row's first ``first`` and last ``last`` real tokens."""
        rank = mask.cumsum(1) - 1  # (B, N): index of each real token among its row's real tokens
        count = mask.sum(1, keepdim=True)  # (B, 1)
        tail = torch.clamp(count - self.last, min=self.first)  # (B, 1): no position is both first and last
        return mask & ((rank < self.first) | (rank >= tail))

    def forward(self, y: Tensor, op: OpHandle, mask: Tensor | None = None) -> Tensor:  # (B, N, D) -> (B, N, D)
        if y.dim() > 3:  # a feature map (B, H, W, D): its positions in raster order
            return self.forward(y.flatten(1, -2), op, mask).view_as(y)
        b, n, d = y.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=y.device)
        chosen = self.chosen(mask.bool())  # (B, N)
        k = min(self.first + self.last, n)
        index = torch.argsort((~chosen).to(torch.uint8), dim=1, stable=True)[:, :k]  # (B, K): chosen ones first
        keep = chosen.gather(1, index)[..., None]  # (B, K, 1): False in rows with fewer than K real tokens
        index = index[..., None].expand(b, k, d)  # (B, K, D)
        edits = torch.where(keep, self.edit(y.gather(1, index)), 0.0)  # (B, K, D)
        return torch.zeros_like(y).scatter(1, index, edits)  # only the chosen positions are edited
