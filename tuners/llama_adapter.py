"""LLaMA-Adapter's adaption prompt: attention over learned prompts, gated from zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.attention import merge_heads
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import positive


@register_tuner("adaption_prompt")
class AdaptionPrompt(Tuner):
    """LLaMA-Adapter's zero-initialised attention (Zhang et al. 2023, arXiv 2303.16199, Eq. 6-8):
    learned prompt tokens ``P`` (K, D) enter attention through the frozen key/value projections,
    their softmax is taken apart from the sequence's and scaled by a gate ``g`` per head that
    starts at zero:

        U(x) = merge_h( g_h · softmax(Q_h (P W_k)_h^T / √Dh) (P W_v)_h )

    with ``Q`` the frozen query projection of the operation's input. Placement ``parallel`` on
    attention sites (``blocks.{i}.attn``; the paper adapts the top layers, e.g.
    ``blocks.{8..11}``): the same form as ``p_prefix``/``p_prompt``, and, as for them, ``U`` is added
    to the attention operation's output, whereas the paper sums it with the ordinary attention
    before the output projection ``W_o`` (equal up to that frozen linear map, which the learned
    prompts can absorb only partly). The prompts pass through the frozen key/value path of the
    site, its pre-norm included. Paper defaults: ``tokens=10``, prompts ~ N(0, 1) (an
    ``nn.Embedding``), ``g = 0`` (identity at init).
    """

    placement = "parallel"
    site_kinds = frozenset({"attn"})
    requires = frozenset({"query", "key_value"})
    paper = "https://arxiv.org/abs/2303.16199"

    def __init__(self, site: SiteSpec, *, tokens: int = 10) -> None:
        super().__init__(site)
        positive("tokens", tokens)
        self.prompts = nn.Parameter(torch.randn(1, tokens, site.dim))  # (1, K, D)
        self.gate = nn.Parameter(torch.zeros(1, site.num_heads, 1, 1))  # (1, H, 1, 1)

    def forward(self, x: Tensor, op: OpHandle) -> Tensor:  # (B, N, D) -> (B, N, H*Dh)
        q = op.query(x)  # (B, H, N, Dh)
        k, v = op.key_value(self.prompts.expand(q.shape[0], -1, -1).to(q.dtype))  # (B, H, K, Dh)
        return merge_heads(self.gate.to(q.dtype) * F.scaled_dot_product_attention(q, k, v))
