"""Tuners that shift or scale a frozen linear layer's output: BitFit and SSF. Both merge."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from utuning.errors import PlacementError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner


def _bias(op: OpHandle, who: str) -> nn.Parameter:
    if op.linear.bias is None:
        raise PlacementError(f"{who} cannot merge into {op.site!r}: the frozen layer has no bias")
    return op.linear.bias


@register_tuner("bitfit")
class BitFit(Tuner):
    """BitFit (Ben Zaken et al. 2021, arXiv 2106.10199): train only the biases.

    Written as a learned bias update ``y = W x + b + δ`` (δ starts at zero), which is the same
    training problem and leaves the frozen bias untouched until ``merge`` adds δ to it.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2106.10199"

    def __init__(self, site: SiteSpec) -> None:
        super().__init__(site)
        self.bias = nn.Parameter(torch.zeros(site.out_dim))

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:
        return y + self.bias

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        _bias(op, "bitfit").add_(self.bias)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        _bias(op, "bitfit").sub_(self.bias)


@register_tuner("ssf")
class SSF(Tuner):
    """Scaling and shifting features (Lian et al. 2022, arXiv 2210.08823): ``y = γ ⊙ (W x + b) + β``.

    γ and β start near 1 and 0 (normal with ``init_std``, the paper's 0.02; 0 gives the exact
    identity). Mergeable: ``W' = γ W``, ``b' = γ b + β``.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2210.08823"

    def __init__(self, site: SiteSpec, *, init_std: float = 0.02) -> None:
        super().__init__(site)
        self.scale = nn.Parameter(1 + init_std * torch.randn(site.out_dim))
        self.shift = nn.Parameter(init_std * torch.randn(site.out_dim))

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:
        return y * self.scale + self.shift

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        bias = _bias(op, "ssf")
        op.linear.weight.mul_(self.scale[:, None])
        bias.mul_(self.scale).add_(self.shift)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        bias = _bias(op, "ssf")
        bias.sub_(self.shift).div_(self.scale)
        op.linear.weight.div_(self.scale[:, None])
