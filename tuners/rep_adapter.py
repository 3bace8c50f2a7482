"""RepAdapter: a linear adapter on a frozen layer's input, folded into that layer at merge."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.errors import ConfigError, PlacementError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import positive


@register_tuner("rep_adapter")
class RepAdapter(Tuner):
    """RepAdapter (Luo et al. 2023, arXiv 2302.08106): a sequential adapter with no activation on
    the input of a frozen linear layer, ``x' = x + s · (B (A x + a) + b)``, with ``A`` dense
    (D -> r) and ``B`` group-wise (r -> D, ``groups`` blocks), so the layer computes
    ``W x' + c``. The paper puts it before attention and the FFN (after their norms): attach it at
    ``blocks.*.attn.qkv`` and ``blocks.*.mlp.fc1``. Being linear, it folds into the frozen layer
    (structural re-parameterisation): ``merge`` sets ``W' = W (I + s B A)``,
    ``c' = c + s W (B a + b)``; ``unmerge`` inverts it through the Woodbury identity
    (``(I + sBA)^-1 = I − s B (I_r + s A B)^-1 A``, in float64). Paper defaults: ``hidden=8``,
    ``groups=2``, ``scale=1``, dropout 0.1 after ``A``; ``A`` Xavier-uniform, ``B`` and the
    biases zero (identity at init). On a site that also holds LoRA-like tuners, those read the
    original input ``x``; ``TunedModel.merge`` folds RepAdapter first, so merging stays exact.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2302.08106"
    transforms_input = True

    def __init__(self, site: SiteSpec, *, hidden: int = 8, groups: int = 2, scale: float = 1.0,
                 dropout: float = 0.1) -> None:
        super().__init__(site)
        positive("hidden", hidden)
        positive("groups", groups)
        if hidden % groups or site.dim % groups:
            raise ConfigError(f"rep_adapter at {site.name!r}: groups={groups} must divide hidden={hidden} "
                              f"and the layer's input width {site.dim}")
        self.groups, self.scale = groups, float(scale)
        self.down = nn.Linear(site.dim, hidden)  # A, a
        self.up_weight = nn.Parameter(torch.zeros(groups, site.dim // groups, hidden // groups))  # B's blocks
        self.up_bias = nn.Parameter(torch.zeros(site.dim))  # b
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def up_matrix(self) -> Tensor:
        """The group-wise ``B`` as one block-diagonal (D, r) matrix."""
        return torch.block_diag(*self.up_weight.unbind(0))

    def reparam_input(self, x: Tensor, op: OpHandle) -> Tensor:  # (..., D) -> (..., D)
        h = self.dropout(self.down(x))  # (..., r)
        return x + self.scale * F.linear(h, self.up_matrix(), self.up_bias)

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:
        return y

    def _folded(self) -> tuple[Tensor, Tensor]:
        """``s B A`` (D, D) and ``s (B a + b)`` (D), in float64."""
        up = self.up_matrix().double()
        return self.scale * up @ self.down.weight.double(), self.scale * (up @ self.down.bias.double() + self.up_bias.double())

    def _bias(self, op: OpHandle, shift: Tensor) -> nn.Parameter | None:
        if op.linear.bias is None and torch.any(shift != 0):
            raise PlacementError(f"rep_adapter cannot merge into {op.site!r}: its biases would need the frozen "
                                 "layer's bias, which it has none of")
        return op.linear.bias

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        m, shift = self._folded()
        w = op.linear.weight.double()
        bias = self._bias(op, shift)
        if bias is not None:
            bias += (w @ shift).to(bias.dtype)
        op.linear.weight.copy_(w + w @ m)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        m, shift = self._folded()
        up = self.scale * self.up_matrix().double()
        a = self.down.weight.double()
        w = op.linear.weight.double()
        inner = torch.eye(a.shape[0], dtype=w.dtype, device=w.device) + a @ up  # (r, r)
        w0 = w - (w @ up) @ torch.linalg.solve(inner, a)  # W' (I + sBA)^-1
        bias = self._bias(op, shift)
        if bias is not None:
            bias -= (w0 @ shift).to(bias.dtype)
        op.linear.weight.copy_(w0)
