"""Prefix tuning: learned keys and values joined inside attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from utuning.errors import PlacementError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import choice, positive


@register_tuner("prefix")
class Prefix(Tuner):
    """Prefix tuning (Li & Liang 2021, arXiv 2101.00190).

    ``Attn(Q, [K_pre; K], [V_pre; V])`` with learned ``K_pre, V_pre`` (H heads x ``tokens``).
    ``reparam_hidden > 0`` uses the paper's reparameterisation ``[K_pre; V_pre] = MLP(E)``
    for stable training; ``fold()`` replaces the MLP by the keys/values it computes.
    ``form="parallel"`` computes the same attention as ``(1-λ)·Attn(Q,K,V) + λ·Attn(Q,K_pre,V_pre)``
    (U-Tuning Eq. 3-5), exactly.
    """

    placement = "prefix"
    site_kinds = frozenset({"attn"})
    paper = "https://arxiv.org/abs/2101.00190"

    def __init__(self, site: SiteSpec, *, tokens: int = 10, reparam_hidden: int = 0, form: str = "joint",
                 init_std: float = 0.02) -> None:
        super().__init__(site)
        positive("tokens", tokens)
        self.decomposed = choice("form", form, ("joint", "parallel")) == "parallel"
        h, dh = site.num_heads, site.head_dim
        self.shape = (1, h, tokens, dh)
        if reparam_hidden:
            positive("reparam_hidden", reparam_hidden)
            self.embedding = nn.Parameter(torch.randn(tokens, site.dim) * init_std)  # (P, D)
            self.mlp = nn.Sequential(nn.Linear(site.dim, reparam_hidden), nn.Tanh(), nn.Linear(reparam_hidden, 2 * h * dh))
        else:
            self.key = nn.Parameter(torch.randn(self.shape) * init_std)  # (1, H, P, Dh)
            self.value = nn.Parameter(torch.randn(self.shape) * init_std)

    def key_value(self) -> tuple[Tensor, Tensor]:
        if hasattr(self, "mlp"):
            kv = self.mlp(self.embedding)  # (P, 2*H*Dh)
            k, v = kv.view(self.shape[2], 2, self.shape[1], self.shape[3]).permute(1, 2, 0, 3).unsqueeze(1)
            return k, v  # each (1, H, P, Dh)
        return self.key, self.value

    def forward(self, batch_size: int, op: OpHandle) -> tuple[Tensor, Tensor]:  # two (B, H, P, Dh)
        k, v = self.key_value()
        return k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)

    @torch.no_grad()
    def fold(self) -> None:
        """Drop the MLP reparameterisation, keeping the keys/values it computes (after training)."""
        if not hasattr(self, "mlp"):
            raise PlacementError("This prefix tuner has no MLP reparameterisation to fold")
        k, v = self.key_value()
        del self.mlp, self.embedding
        self.key, self.value = nn.Parameter(k.clone()), nn.Parameter(v.clone())
