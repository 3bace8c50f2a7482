"""DiffFit: biases, norms and a learned scale on each residual branch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from utuning.handle import OpHandle
from utuning.registry import register_composition, register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner, TunerSpec
from utuning.tuners.compositions import _layers


@register_tuner("difffit_scale")
class DiffFitScale(Tuner):
    """DiffFit's scale factor (Xie et al. 2023, arXiv 2304.06648): the residual branch
    ``x + OP(x)`` becomes ``x + γ ⊙ OP(x)``, written as the sequential tuner
    ``y = OP(x); y = y + (γ − 1) ⊙ y`` with a per-channel ``γ`` starting at one (identity).
    The composition ``difffit`` adds the rest of the method (biases and norms).
    """

    placement = "sequential"
    site_kinds = frozenset({"attn", "mlp", "block"})
    paper = "https://arxiv.org/abs/2304.06648"

    def __init__(self, site: SiteSpec) -> None:
        super().__init__(site)
        self.gamma = nn.Parameter(torch.ones(site.out_dim))  # (D)

    def forward(self, y: Tensor, op: OpHandle) -> Tensor:  # (B, N, D) -> (B, N, D)
        return y * (self.gamma - 1)


@register_composition("difffit")
def difffit(at: str | list[str] = "blocks.*", **args: Any) -> list[TunerSpec]:
    """DiffFit (arXiv 2304.06648): BitFit on every linear layer of the chosen blocks, LN tuning of
    their norms, and a scale ``γ`` on every attention and FFN branch. The
    paper inserts ``γ`` only in some blocks of its DiT; pick them with ``at`` (e.g.
    ``blocks.{6..11}``), biases and norms follow the same blocks."""
    b = _layers(at)
    return [TunerSpec("difffit_scale", [f"{b}.attn", f"{b}.mlp"], dict(args)),
            TunerSpec("bitfit", f"{b}.*.*", {}),
            TunerSpec("ln_tuning", [f"{b}.attn", f"{b}.mlp"], {})]
