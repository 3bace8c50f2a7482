"""Prompt tuning: VPT (shallow and deep) and its exact parallel form."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from utuning.errors import ConfigError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import choice, init_prompts, positive


@register_tuner("prompt")
class Prompt(Tuner):
    """Visual prompt tuning (Jia et al. 2022, arXiv 2203.12119); prompt tuning for text
    (Lester et al. 2021, arXiv 2104.08691).

    Learned tokens are inserted after the class/register tokens before the operation. At
    ``blocks.*`` their outputs are dropped after each block and new ones inserted before the
    next: VPT-deep. At ``embed`` (or with ``keep_outputs=True`` at ``blocks.0``) the outputs flow
    through all later blocks and are dropped before the head: VPT-shallow.
    """

    placement = "prompt"
    site_kinds = frozenset({"embed", "block"})
    paper = "https://arxiv.org/abs/2203.12119"

    def __init__(self, site: SiteSpec, *, tokens: int = 10, dropout: float = 0.0, init: str = "vpt",
                 keep_outputs: bool | None = None) -> None:
        super().__init__(site)
        positive("tokens", tokens)
        self.prompts = nn.Parameter(torch.empty(1, tokens, site.dim))  # (1, P, D)
        init_prompts(self.prompts.data, site.info, init)
        self.dropout = nn.Dropout(dropout)
        self.keep_outputs = site.kind == "embed" if keep_outputs is None else bool(keep_outputs)
        if site.kind == "embed" and not self.keep_outputs:
            # The embed operation is the identity on tokens: dropped prompts would do nothing.
            raise ConfigError(f"prompt at {site.name!r} must keep its outputs (keep_outputs=True, VPT-shallow)")

    def forward(self, batch_size: int, op: OpHandle) -> Tensor:  # -> (B, P, D)
        return self.dropout(self.prompts.expand(batch_size, -1, -1))


@register_tuner("prompt_parallel")
class PromptParallel(Tuner):
    """VPT-deep in Res-Tuning's exact parallel form (arXiv 2310.19859, Eq. 11-13).

    With prompts ``P`` entering a block, the other tokens' attention output is exactly
    ``(1-λ)·Attn(Q, K, V) + λ·Attn(Q, W_k·norm(P), W_v·norm(P))``: the prompts act as a prefix
    projected by the frozen key/value weights. Attached at ``blocks.{i}.attn`` with the same
    tokens, it equals ``prompt`` at ``blocks.{i}`` on every non-prompt token (tested to 1e-10).
    """

    placement = "prefix"
    site_kinds = frozenset({"attn"})
    requires = frozenset({"key_value"})
    paper = "https://arxiv.org/abs/2310.19859"

    def __init__(self, site: SiteSpec, *, tokens: int = 10, dropout: float = 0.0, init: str = "vpt",
                 form: str = "parallel") -> None:
        super().__init__(site)
        positive("tokens", tokens)
        self.prompts = nn.Parameter(torch.empty(1, tokens, site.dim))  # (1, P, D)
        init_prompts(self.prompts.data, site.info, init)
        self.dropout = nn.Dropout(dropout)
        self.decomposed = choice("form", form, ("joint", "parallel")) == "parallel"

    def forward(self, batch_size: int, op: OpHandle) -> tuple[Tensor, Tensor]:  # two (B, H, P, Dh)
        return op.key_value(self.dropout(self.prompts.expand(batch_size, -1, -1)))
