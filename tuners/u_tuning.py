"""The U-Tuning parallel tuners: ``x' = OP(x) + U(x)`` (Jiang et al. 2023, arXiv 2303.00690;
Res-Tuning, arXiv 2310.19859).

Each reads the operation's input ``x`` and may sit on an ``attn``, ``mlp`` or ``block`` site.
``p_prefix`` and ``p_prompt`` attend with the frozen query projection of the site's block (see
the backbone's docs for which norm precedes it). Scales: none, scalar, channel (the paper's
default) or an input-dependent gate. Every tuner starts as the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.attention import merge_heads
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import Bottleneck, Scale, init_prompts, positive

OP_KINDS = frozenset({"attn", "mlp", "block"})
PAPER = "https://arxiv.org/abs/2303.00690"


@register_tuner("p_adapter")
class ParallelAdapterTuner(Tuner):
    """U-Tuning's parallel adapter (arXiv 2303.00690): ``U(x) = s ⊙ up(act(down(x)))`` (up starts at zero)."""

    placement = "parallel"
    site_kinds = OP_KINDS
    paper = PAPER

    def __init__(self, site: SiteSpec, *, hidden: int = 10, scale: str = "channel", act: str = "gelu",
                 dropout: float = 0.0) -> None:
        super().__init__(site)
        self.bottleneck = Bottleneck(site.dim, hidden, site.out_dim, act=act, dropout=dropout)
        self.scale = Scale(scale, site.out_dim)

    def forward(self, x: Tensor, op: OpHandle) -> Tensor:  # (B, N, D) -> (B, N, D)
        return self.scale(self.bottleneck(x), x)


@register_tuner("p_prefix")
class ParallelPrefix(Tuner):
    """U-Tuning's parallel prefix (arXiv 2303.00690): ``U(x) = s ⊙ Attn(x W_q, K_pre, V_pre)`` with the frozen ``W_q``
    and learned ``K_pre, V_pre``; ``V_pre`` starts at zero."""

    placement = "parallel"
    site_kinds = OP_KINDS
    requires = frozenset({"query"})
    paper = PAPER

    def __init__(self, site: SiteSpec, *, tokens: int = 10, scale: str = "channel", init_std: float = 0.02) -> None:
        super().__init__(site)
        positive("tokens", tokens)
        shape = (1, site.num_heads, tokens, site.head_dim)  # (1, H, P, Dh)
        self.key = nn.Parameter(torch.randn(shape) * init_std)
        self.value = nn.Parameter(torch.zeros(shape))
        self.scale = Scale(scale, site.num_heads * site.head_dim)

    def forward(self, x: Tensor, op: OpHandle) -> Tensor:  # (B, N, D) -> (B, N, H*Dh)
        q = op.query(x)  # (B, H, N, Dh)
        b = q.shape[0]
        o = F.scaled_dot_product_attention(q, self.key.expand(b, -1, -1, -1).to(q.dtype), self.value.expand(b, -1, -1, -1).to(q.dtype))
        return self.scale(merge_heads(o), x)


@register_tuner("p_prompt")
class ParallelPrompt(Tuner):
    """U-Tuning's parallel prompt (arXiv 2303.00690): ``U(x) = s ⊙ Attn(x W_q, P W_k, P W_v)``: learned prompt tokens
    projected by the frozen key/value weights. The scale starts at zero."""

    placement = "parallel"
    site_kinds = OP_KINDS
    requires = frozenset({"query", "key_value"})
    paper = PAPER

    def __init__(self, site: SiteSpec, *, tokens: int = 10, scale: str = "channel", init: str = "vpt") -> None:
        super().__init__(site)
        positive("tokens", tokens)
        self.prompts = nn.Parameter(torch.empty(1, tokens, site.dim))  # (1, P, D)
        init_prompts(self.prompts.data, site.info, init)
        # A zero scale makes the tuner start as the identity; "none" and "gate" scales do not.
        self.scale = Scale(scale, site.num_heads * site.head_dim, init=0.0 if scale != "gate" else 0.5)

    def forward(self, x: Tensor, op: OpHandle) -> Tensor:  # (B, N, D) -> (B, N, H*Dh)
        q = op.query(x)  # (B, H, N, Dh)
        k, v = op.key_value(self.prompts.expand(q.shape[0], -1, -1))  # (B, H, P, Dh)
        return self.scale(merge_heads(F.scaled_dot_product_attention(q, k, v)), x)
