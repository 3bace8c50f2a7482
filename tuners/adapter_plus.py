"""Adapter+: the post-adapter with channel-wise scaling (Steitz & Roth, CVPR 2024)."""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import ACTIVATIONS, choice, positive

INITS = ("houlsby", "zero")


@register_tuner("adapter_plus")
class AdapterPlus(Tuner):
    """Adapter+ (Steitz & Roth 2024, "Adapters Strike Back", arXiv 2406.06820): a bottleneck
    adapter in the *post* position, reading the FFN's output and adding to it,
    ``y = OP(x); y = y + drop_path(s ⊙ up(act(down(y))))``, with a learned channel-wise scale ``s``
    (ones at init) and no layer norm inside the adapter. Attach at ``blocks.*.mlp``.

    Paper defaults: ``hidden=8``, GELU, ``init="houlsby"`` (both projections truncated
    normal, std 0.01 within ±2 std, zero biases: near, not exactly, the identity; ``"zero"`` puts
    ``up`` at zero for an exact identity), stochastic depth 0.1 on the adapter branch.
    """

    placement = "sequential"
    site_kinds = frozenset({"mlp", "attn", "block"})
    paper = "https://arxiv.org/abs/2406.06820"

    def __init__(self, site: SiteSpec, *, hidden: int = 8, act: str = "gelu", init: str = "houlsby",
                 drop_path: float = 0.1) -> None:
        super().__init__(site)
        positive("hidden", hidden)
        choice("init", init, INITS)
        self.down = nn.Linear(site.out_dim, hidden)
        self.act = ACTIVATIONS[choice("act", act, ACTIVATIONS)]()
        self.up = nn.Linear(hidden, site.out_dim)
        self.scale = nn.Parameter(torch.ones(site.out_dim))  # (D): channel-wise
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        std = 0.01
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(layer.bias)
        if init == "zero":
            nn.init.zeros_(self.up.weight)

    def forward(self, y: Tensor, op: OpHandle) -> Tensor:  # (B, N, D) -> (B, N, D)
        return self.drop_path(self.up(self.act(self.down(y))) * self.scale)
