"""The baselines, through the same API as every tuner: a trainable head, and full fine-tuning."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner


@register_tuner("linear_probe")
class LinearProbe(Tuner):
    """A trainable linear classifier in place of the frozen head (the linear-probe baseline, and
    the head every other method trains; VPT's "Linear" row, arXiv 2203.12119). It starts as a copy of
    the frozen head when the shapes agree, so attaching it leaves the outputs unchanged; otherwise
    ``trunc_normal(0.02)``."""

    placement = "replace"
    site_kinds = frozenset({"head"})
    paper = "https://arxiv.org/abs/2203.12119"

    def __init__(self, site: SiteSpec, *, num_classes: int | None = None) -> None:
        super().__init__(site)
        self.fc = nn.Linear(site.dim, num_classes or site.out_dim)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor, op: OpHandle) -> Tensor:  # (B, D) -> (B, classes)
        return self.fc(x)

    @torch.no_grad()
    def on_attach(self, op: OpHandle) -> None:
        head = op.modules.get("head")
        if isinstance(head, nn.Linear) and head.weight.shape == self.fc.weight.shape:
            self.fc.weight.copy_(head.weight)
            if head.bias is not None:
                self.fc.bias.copy_(head.bias)


@register_tuner("full")
class Full(Tuner):
    """Full fine-tuning of the frozen operation's own parameters (composition ``full_finetune``
    covers the whole model). Its state dict holds those parameters under stable names."""

    placement = "unfreeze"

    def __init__(self, site: SiteSpec) -> None:
        super().__init__(site)

    def trainable(self, op: OpHandle) -> dict[str, nn.Parameter]:
        return dict(op.named_parameters())
