"""``torch.nn.MultiheadAttention`` with operation slots, for the generic adapter (``generic.py``).

PyTorch's own attention (inside ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` and many user
models) computes its projections inside one fused call, so LoRA on q/k/v, prefix tuning or a
parallel prefix cannot reach them from outside. ``TunedMultiheadAttention`` re-writes it: the
same parameters under the same names (``in_proj_weight`` / ``q_proj_weight``..., ``in_proj_bias``,
``bias_k``, ``bias_v``, ``out_proj``), so state-dict keys do not change, and a forward that calls
its frozen operations through slots (U-Tuning, arXiv 2303.00690)::

    q, k, v = in_proj(query, key, value)        # site {p}.in_proj (fused, split 3) or {p}.{q,k,v}_proj
    o = Attn(q, [K_pre; k], [V_pre; v], mask)   # site {p}: prefix, parallel, sequential, unfreeze
    y = out_proj(o)                             # site {p}.out_proj

It reproduces ``nn.MultiheadAttention.forward`` (batch-first or not, unbatched inputs, boolean
or additive ``attn_mask`` / ``key_padding_mask``, ``bias_k``/``bias_v``, ``add_zero_attn``,
``need_weights``); the tests hold both equal. With learned prefixes and ``need_weights`` the
returned weights cover the prefix keys first, then the frozen keys. Run the model through its
backbone (``GenericBackbone.forward`` turns PyTorch's fused encoder-layer path off): called
directly in eval mode without gradients, ``nn.TransformerEncoderLayer`` would take that path,
which does not call this module, and fails on its missing ``merge_masks`` instead of silently
skipping the tuners.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.attention import attend, merge_heads, split_heads
from utuning.errors import PlacementError
from utuning.handle import LinearHandle, OpHandle
from utuning.sites import SiteSpec
from utuning.slot import Slot

_ATTN_PLACEMENTS = frozenset({"parallel", "sequential", "prefix", "unfreeze"})
_REFUSED = {"prompt": "prompt tokens would have to join the query, key and value sequences of an "
                      "nn.MultiheadAttention, whose caller owns them; use prefix (learned keys/values) instead"}
_PROJ = {"q": 0, "k": 1, "v": 2}


class Projection:
    """A frozen input projection of an ``nn.MultiheadAttention`` seen as a linear layer (``weight``,
    ``bias``, callable): the fused ``in_proj`` (3·E, E) (``part=None``) or the q, k or v part. Plain
    object, read from the module at each use, so merging tuners write into its own parameters."""

    def __init__(self, mha: TunedMultiheadAttention, part: str | None) -> None:
        self.mha, self.part = mha, part

    def _rows(self, t: Tensor | None) -> Tensor | None:
        """The rows of the fused (3·E, ...) tensor ``t`` that compute ``part``: a view, so writing into
        it writes into the module's parameter."""
        if t is None or self.part is None:
            return t
        e, i = self.mha.embed_dim, _PROJ[self.part]
        return t[i * e:(i + 1) * e]

    @property
    def weight(self) -> Tensor:
        if self.part is None or self.mha._qkv_same_embed_dim:
            return self._rows(self.mha.in_proj_weight)
        return getattr(self.mha, f"{self.part}_proj_weight")

    @property
    def bias(self) -> Tensor | None:
        return self._rows(self.mha.in_proj_bias)

    @weight.setter
    def weight(self, value: Tensor) -> None:  # ``layer.weight += delta`` (in place) assigns it back
        _write(self.weight, value)

    @bias.setter
    def bias(self, value: Tensor) -> None:
        _write(self.bias, value)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:  # (..., D_in) -> (..., D_out)
        return F.linear(x, self.weight, self.bias)


@torch.no_grad()
def _write(target: Tensor | None, value: Tensor) -> None:
    if target is None:
        raise PlacementError("This projection has no bias to write into")
    if value is not target:
        target.copy_(value)


class ProjectionHandle(OpHandle):
    """Handle of an input-projection site: ``linear`` is its ``Projection``."""

    def __init__(self, site: str, projection: Projection) -> None:
        super().__init__(site, {})
        self.projection = projection

    def named_parameters(self):
        m = self.projection.mha
        name = "in_proj_weight" if self.projection.part is None else f"{self.projection.part}_proj_weight"
        yield name, getattr(m, name)
        if m.in_proj_bias is not None:
            yield "in_proj_bias", m.in_proj_bias

    @property
    def linear(self) -> Projection:
        return self.projection


class AttentionHandle(OpHandle):
    """Handle of the attention site: its frozen modules and its frozen q / k / v projections."""

    def __init__(self, site: str, mha: TunedMultiheadAttention) -> None:
        super().__init__(site, {"": mha})
        self.mha = mha

    def named_parameters(self):
        yield from self.mha.named_parameters()

    def _project(self, x: Tensor, part: str) -> Tensor:
        return split_heads(self.mha.projection(part)(x), self.mha.num_heads)  # (B, H, N, Dh)

    def query(self, x: Tensor) -> Tensor:
        return self._project(x, "q")

    def key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self._project(tokens, "k"), self._project(tokens, "v")


class TunedMultiheadAttention(nn.Module):
    """An ``nn.MultiheadAttention`` whose projections and attention run through slots.

    Built by ``add_attention_sites``; keeps the original parameters (same objects, same names)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn"):
            setattr(self, name, getattr(mha, name))
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                     "bias_k", "bias_v"):
            self.register_parameter(name, getattr(mha, name))
        self.out_proj = mha.out_proj
        self.training = mha.training
        self.slots: dict[str, Slot] = {}  # plain dict: the slots are registered in the backbone adapter

    def projection(self, part: str) -> Projection:
        """The frozen projection computing ``part`` (q, k or v), without tuners."""
        return Projection(self, part)

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool) -> tuple[Tensor, ...]:
        """q (B, L, E), k and v (B, S, E), through the projection slots (reparam tuners)."""
        if self._qkv_same_embed_dim:
            slot, proj = self.slots["in_proj"], Projection(self, None)
            if self_attention:
                return slot.linear(query, proj).chunk(3, dim=-1)
            # Cross-attention: the fused layer (and its tuners) on each input, keeping its own third.
            return tuple(slot.linear(t, proj).chunk(3, dim=-1)[i] for i, t in enumerate((query, key, value)))
        return tuple(self.slots[f"{p}_proj"].linear(t, Projection(self, p)) for p, t in zip("qkv", (query, key, value)))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            n = query.shape[1]
            attn_mask = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1)
        weights: list[Tensor] = []

        def attention(x: Tensor, _mask: Tensor | None) -> Tensor:  # the frozen operation: (B, L, E) -> (B, L, E)
            k, v = (x, x) if self_attention else (key, value)
            out, w = self._attention(x, k, v, key_padding_mask, attn_mask, need_weights, self_attention)
            weights.extend([] if w is None else [w])
            return out

        y = self.slots["attn"].apply(query, attention)  # (B, L, E), with the site's tuners
        w = None
        if weights:
            w = weights[0].mean(1) if average_attn_weights else weights[0]  # (B, L, S) or (B, H, L, S)
            w = w.squeeze(0) if unbatched else w
        if unbatched:
            return y.squeeze(0), w
        return (y if self.batch_first else y.transpose(0, 1)), w

    def _attention(self, x: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                   attn_mask: Tensor | None, need_weights: bool, self_attention: bool) -> tuple[Tensor, Tensor | None]:
        b, n_q = x.shape[:2]
        h = self.num_heads
        q, k, v = self._project(x, key, value, self_attention)  # (B, L|S, E)
        if self.bias_k is not None:  # one learned key/value appended to every sequence
            k = torch.cat([k, self.bias_k.reshape(1, 1, -1).expand(b, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, -1).expand(b, 1, -1)], dim=1)
        q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)  # (B, H, L|S, Dh)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(b, h, 1, k.shape[-1])], dim=2)
            v = torch.cat([v, v.new_zeros(b, h, 1, v.shape[-1])], dim=2)
        n_k = key.shape[1]  # the caller's keys; bias_k and zero keys follow them
        bias = self._mask(attn_mask, key_padding_mask, b, n_q, k.shape[2], q.dtype)  # (B, H, L, S) or None
        prefixes, decomposed = self.slots["attn"].prefixes(b)
        drop = self.dropout if self.training else 0.0
        if decomposed and prefixes and not need_weights:
            if attn_mask is not None or (key_padding_mask is not None and key_padding_mask.dtype != torch.bool):
                raise PlacementError(f"Site {self.slots['attn'].spec.name!r}: prefix form='parallel' is computed with "
                                     "a boolean key padding mask only; use form='joint' (the same attention)")
            keep = None if key_padding_mask is None else F.pad(~key_padding_mask, (0, k.shape[2] - n_k), value=True)
            o = attend(q, k, v, key_mask=keep, prefixes=prefixes, decomposed=True, dropout_p=drop)
            return self._out(o), None
        if prefixes:
            k = torch.cat([p[0].to(k.dtype) for p in prefixes] + [k], dim=2)
            v = torch.cat([p[1].to(v.dtype) for p in prefixes] + [v], dim=2)
            bias = None if bias is None else F.pad(bias, (k.shape[2] - bias.shape[-1], 0))  # prefixes always visible
        if need_weights:
            logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, L, S)
            probs = F.dropout((logits if bias is None else logits + bias).softmax(-1), drop, training=drop > 0)
            return self._out(probs @ v), probs
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)  # (B, H, L, Dh)
        return self._out(o), None

    def _out(self, o: Tensor) -> Tensor:  # (B, H, L, Dh) -> (B, L, E)
        return self.slots["out_proj"].linear(merge_heads(o), self.out_proj)

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, b: int, n_q: int, n_k: int,
              dtype: torch.dtype) -> Tensor | None:
        """One additive mask (B, H, L, S) from boolean (True: masked) or additive masks, with the
        appended ``bias_k`` / zero keys visible."""
        if attn_mask is None and key_padding_mask is None:
            return None
        bias = torch.zeros(b, self.num_heads, n_q, n_k - (self.bias_k is not None) - self.add_zero_attn,
                           dtype=dtype, device=(attn_mask if attn_mask is not None else key_padding_mask).device)
        for mask, shape in ((attn_mask, None), (key_padding_mask, (b, 1, 1, -1))):
            if mask is None:
                continue
            add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf")) \
                if mask.dtype == torch.bool else mask.to(dtype)
            if shape is None and add.dim() == 3:
                shape = (b, self.num_heads, n_q, -1)  # (B*H, L, S)
            bias = bias + (add.reshape(shape) if shape is not None else add)
        return F.pad(bias, (0, n_k - bias.shape[-1]))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def add_attention_sites(backbone: Any, path: str, mha: nn.MultiheadAttention) -> TunedMultiheadAttention:
    """Register the sites of the ``nn.MultiheadAttention`` at ``path`` on ``backbone`` (a
    ``utuning.Backbone``) and return the module that replaces it in its parent."""
    tuned = TunedMultiheadAttention(mha)
    e, h = mha.embed_dim, mha.num_heads
    spec = SiteSpec(path, "attn", e, _ATTN_PLACEMENTS, out_dim=e, num_heads=h, head_dim=mha.head_dim,
                    features=frozenset({"query", "key_value"}), refused=_REFUSED)
    tuned.slots["attn"] = backbone.add_site(spec, AttentionHandle(path, tuned))
    linear = frozenset({"reparam", "unfreeze"})
    if mha._qkv_same_embed_dim:
        site = SiteSpec(f"{path}.in_proj", "linear", e, linear, out_dim=3 * e, info={"split": 3})
        tuned.slots["in_proj"] = backbone.add_site(site, ProjectionHandle(site.name, Projection(tuned, None)))
    else:
        for part, dim in (("q", e), ("k", mha.kdim), ("v", mha.vdim)):
            site = SiteSpec(f"{path}.{part}_proj", "linear", dim, linear, out_dim=e)
            tuned.slots[f"{part}_proj"] = backbone.add_site(site, ProjectionHandle(site.name, Projection(tuned, part)))
    out = mha.out_proj
    site = SiteSpec(f"{path}.out_proj", "linear", out.in_features, linear, out_dim=out.out_features)
    tuned.slots["out_proj"] = backbone.add_site(site, LinearHandle(site.name, out))
    return tuned
