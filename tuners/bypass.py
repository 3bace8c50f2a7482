"""Res-Tuning-Bypass: a side chain of Res-Tuners beside a frozen backbone (Jiang et al. 2023,
arXiv 2310.19859, Sec. 3.3).

Res-Tuning unbinds the tuner from the frozen operation; the bypass form moves every tuner off
the backbone so that the backbone runs once, without gradients (memory-efficient training).
For the chosen blocks ``l_1 < ... < l_K`` with detached outputs ``f_k`` (B, N, D)::

    h_1 = L_1(f_1)                                      # the side state (B, N, D)
    h_k = h_{k-1} + V_k(h_{k-1}) + L_k(f_k)             # vertical and lateral Res-Tuners, k >= 2
    z   = pooled + pool(h_K)                            # merged with the frozen pre-logits (B, D)
    logits = head(z)                                    # (B, num_classes)

Lateral (horizontal) Res-Tuners read a frozen block's detached output, vertical ones the side
chain; each is a Res-Adapter (``s ⊙ up(act(down(LN(x))))``) or a Res-Prefix (``s ⊙
Attn(LN(x), K_pre, V_pre)`` with learned keys/values; the side chain has no frozen query
projection, so the normalised tokens are the queries). Each Res-Tuner normalises its input, so
the side state stays on the scale its (learned) outputs give it. Every ``up`` / ``V_pre`` starts
at zero, so at initialisation ``z`` is the frozen pre-logits and the head a linear probe; the head starts
as a copy of the frozen head when the shapes agree. ``pool``: ``first`` (class token) or
``mean`` (over real tokens, ``Features.mask``).

Memory: the side chain runs over every chosen block's full token map, so keeping each Res-Tuner's
activations for backward would cost several (B, N, D) tensors per block. With ``checkpoint=True``
(the default: memory-efficient training is the point of the bypass) each step
``h_{k-1} -> h_k`` is recomputed in backward (``torch.utils.checkpoint``, non-reentrant, RNG state
kept), so only the side states ``h_k`` stay alive; the outputs and gradients are unchanged and the
extra cost is one more forward of the small side chain.

Time: every Res-Tuner (adapter, or attention over learned keys only) acts on each token alone, so
with ``pool="first"`` (the default) only the first token's chain can reach ``z``, and only that one
is computed: the same output for 1/N of the side chain's work (on vit_small the whole bypass step
fell from 0.43 to about a linear probe's share of full fine-tuning; benchmarks/README.md).
``pool="mean"`` needs every token's chain.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute

from utuning.attention import merge_heads, split_heads
from utuning.backbone import Features
from utuning.errors import PlacementError
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import SideTuner
from utuning.tuners._common import Bottleneck, Scale, choice, positive, start_from_frozen_head
from utuning.tuners.ytuning import layer_features

RES_TUNERS = ("adapter", "prefix")
POOLS = ("first", "mean")


class ResAdapter(nn.Module):
    """Res-Adapter on the side chain: ``s ⊙ up(act(down(LN(x))))``, ``up`` at zero."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.bottleneck = Bottleneck(dim, hidden, act="gelu", dropout=dropout)
        self.scale = Scale("channel", dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        return self.scale(self.bottleneck(self.norm(x)), x)


class ResPrefix(nn.Module):
    """Res-Prefix on the side chain: ``s ⊙ Attn(LN(x), K_pre, V_pre)``, ``V_pre`` at zero."""

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        positive("tokens", tokens)
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Parameter(torch.randn(1, heads, tokens, dim // heads) * 0.02)  # (1, H, P, Dh)
        self.value = nn.Parameter(torch.zeros(1, heads, tokens, dim // heads))
        self.scale = Scale("channel", dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        q = split_heads(self.norm(x), self.heads)  # (B, H, N, Dh)
        b = q.shape[0]
        o = F.scaled_dot_product_attention(q, self.key.expand(b, -1, -1, -1), self.value.expand(b, -1, -1, -1))
        return self.scale(merge_heads(o), x)


def res_tuner(kind: str, site: SiteSpec, hidden: int, tokens: int, dropout: float) -> nn.Module:
    if kind == "adapter":
        return ResAdapter(site.dim, hidden, dropout)
    return ResPrefix(site.dim, site.num_heads or 1, tokens)


@register_tuner("bypass")
class ResTuningBypass(SideTuner):
    """Res-Tuning-Bypass (arXiv 2310.19859 Sec. 3.3): lateral + vertical Res-Tuners on a side
    chain, merged with the frozen pre-logits, pooled and classified. ``lateral`` / ``vertical``:
    ``adapter`` (bottleneck ``hidden``) or ``prefix`` (``tokens`` learned keys/values)."""

    paper = "https://arxiv.org/abs/2310.19859"

    def __init__(self, sites: Sequence[SiteSpec], *, num_classes: int, lateral: str = "adapter",
                 vertical: str = "adapter", hidden: int = 64, tokens: int = 10, pool: str = "first",
                 dropout: float = 0.0, checkpoint: bool = True) -> None:
        super().__init__(sites)
        positive("num_classes", num_classes)
        positive("hidden", hidden)
        choice("lateral", lateral, RES_TUNERS)
        choice("vertical", vertical, RES_TUNERS)
        self.pool = choice("pool", pool, POOLS)
        self.checkpoint = bool(checkpoint)
        site = self.sites[0]
        widths = sorted({s.dim for s in self.sites})
        if len(widths) > 1:  # the side chain adds block outputs of one width (and token count) to each other
            raise PlacementError(f"bypass chains the outputs of blocks of one width; the selected blocks have widths "
                                 f"{widths} (stages of a hierarchical backbone): select the blocks of one stage, e.g. "
                                 "at='stages.3', or use ytuning, which projects each block on its own")
        self.lateral = nn.ModuleList(res_tuner(lateral, site, hidden, tokens, dropout) for _ in self.layers)
        # h_0 = 0, so the first vertical tuner would only add a constant: the chain starts at L_1.
        self.vertical = nn.ModuleList(res_tuner(vertical, site, hidden, tokens, dropout) for _ in self.layers[1:])
        self.head = nn.Linear(site.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)


    def on_attach(self, backbone) -> None:
        start_from_frozen_head(self.head, backbone)

    def side_feature(self, feats: Features) -> Tensor:
        """The merged side feature ``z`` (B, D) before the head."""
        # Every Res-Tuner acts on each token alone (no token mixing on the side chain), so with
        # pool="first" only the first token's chain reaches z: compute just that one (exact).
        tokens = slice(0, 1) if self.pool == "first" else slice(None)
        first = layer_features(feats, self.layers[0], self.name)[:, tokens]  # (B, N or 1, D), detached
        save = self.checkpoint and torch.is_grad_enabled()
        h = recompute(self.lateral[0], first, use_reentrant=False) if save else self.lateral[0](first)  # h_1
        for lateral, vertical, i in zip(self.lateral[1:], self.vertical, self.layers[1:]):
            f = layer_features(feats, i, self.name)[:, tokens]
            if save:
                h = recompute(_side_step, vertical, lateral, h, f, use_reentrant=False)
            else:
                h = _side_step(vertical, lateral, h, f)  # (B, N, D)
        if self.pool == "first":
            pooled = h[:, 0]  # (B, D)
        elif feats.mask is None:
            pooled = h.mean(1)
        else:
            m = feats.mask[..., None].to(h.dtype)  # (B, N, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        return feats.pooled + pooled

    def forward(self, feats: Features) -> Tensor:  # -> (B, num_classes)
        return self.head(self.side_feature(feats))

    def extra_repr(self) -> str:
        return f"layers={self.layers}, pool={self.pool!r}, checkpoint={self.checkpoint}"


def _side_step(vertical: nn.Module, lateral: nn.Module, h: Tensor, f: Tensor) -> Tensor:
    """``h_k = h_{k-1} + V_k(h_{k-1}) + L_k(f_k)`` (B, N, D)."""
    return h + vertical(h) + lateral(f)
