"""Attention with learned prefixes, in the original (joint) and the exact parallel form.

Prefix tuning joins learned keys/values to the frozen ones::

    Attn(Q, [K_pre; K], [V_pre; V]) = (1 - λ)·Attn(Q, K, V) + λ·Attn(Q, K_pre, V_pre)

where λ is the softmax mass that a query puts on the prefix keys (U-Tuning, arXiv 2303.00690,
Eq. 3-5; Res-Tuning, arXiv 2310.19859, Eq. 8-13). ``attend(..., decomposed=True)`` computes the
right-hand side, one group of keys at a time, with λ from log-sum-exps; both sides are equal up
to rounding, and the tests hold them to 1e-10 in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

KV = tuple[Tensor, Tensor]


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    prefixes: Sequence[KV] = (),
    decomposed: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Multi-head attention of ``q`` over ``k, v`` and any learned prefixes.

    q: (B, H, Nq, Dh); k, v: (B, H, N, Dh); each prefix (k_pre, v_pre): (B, H, P, Dh).
    key_mask: (B, N) bool, True where a key is a real token; prefix keys are always visible.
    Returns (B, H, Nq, Dh).
    """
    if not decomposed or not prefixes:
        if prefixes:
            k = torch.cat([p[0] for p in prefixes] + [k], dim=2)
            v = torch.cat([p[1] for p in prefixes] + [v], dim=2)
            if key_mask is not None:
                n_pre = sum(p[0].shape[2] for p in prefixes)
                key_mask = torch.cat([key_mask.new_ones(key_mask.shape[0], n_pre), key_mask], dim=1)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = [(k, v, key_mask)] + [(pk, pv, None) for pk, pv in prefixes]
    outs, lses = [], []
    for k_g, v_g, m_g in groups:
        logits = (q @ k_g.transpose(-2, -1)) * scale  # (B, H, Nq, Ng)
        if m_g is not None:
            logits = logits.masked_fill(~m_g[:, None, None, :], float("-inf"))
        lses.append(logits.logsumexp(dim=-1, keepdim=True))  # (B, H, Nq, 1)
        probs = F.dropout(logits.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
        outs.append(probs @ v_g)  # (B, H, Nq, Dh)
    total = torch.logsumexp(torch.stack(lses), dim=0)
    # λ_g = exp(lse_g - lse_total): the softmax mass of group g; the λ_g sum to one.
    return sum(torch.exp(lse - total) * out for lse, out in zip(lses, outs))


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*Dh) -> (B, H, N, Dh)."""
    b, n, _ = x.shape
    return x.view(b, n, num_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, Dh) -> (B, N, H*Dh)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)
