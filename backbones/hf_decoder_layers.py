"""Decoder layers of Hugging Face causal language models re-written with operation slots.

Two layer shapes are re-written, each keeping HF's frozen submodules under their original names
(so the state-dict keys do not change):

* ``LlamaLayer``: Llama, Mistral, Qwen2, Qwen3 (pre-RMSNorm, rotary positions, grouped-query
  attention, SwiGLU; Qwen3 also normalises q and k per head)::

      x = x + attn_op(x)   # attn_op = input_layernorm -> q/k/v -> rotary -> attention -> o_proj
      x = x + mlp_op(x)    # mlp_op  = post_attention_layernorm -> down(act(gate(x)) * up(x))

* ``GPT2Layer``: GPT-2 (pre-LayerNorm, fused ``c_attn`` as ``Conv1D``, learned absolute positions
  added once at the embedding)::

      x = x + attn_op(x)   # attn_op = ln_1 -> c_attn -> attention -> c_proj -> resid_dropout
      x = x + mlp_op(x)    # mlp_op  = ln_2 -> c_fc -> act -> c_proj -> dropout

Positions, the causal mask and prompt tokens
--------------------------------------------
Every token of a chunk has a position: real tokens count the real tokens before them (left
padding does not shift them, as in HF ``generate``); **prompt tokens have negative positions**
``-P..-1`` in the order they sit at the start of the sequence and are **not rotated** (their rotary
angle is zero). A key is visible to a query when it is a real (non-pad) token and its position is
``<=`` the query's (and, with a sliding window, within the window of real positions). Hence
prompts form a causal prefix that every real token sees, real tokens never see padding, and real
tokens keep the positions they have without prompts. With un-rotated prompt keys, ``prompt`` at
``blocks.{i}`` and ``prompt_parallel`` at ``blocks.{i}.attn`` (prompt keys/values through the
frozen projections) give the same outputs on real tokens: the exact parallel identity of
Res-Tuning (arXiv 2310.19859, Eq. 11-13), tested to 1e-10. Learned prefix keys/values (prefix
tuning) are joined in front of the keys, always visible and never rotated.

The KV cache (``DecoderCache``) holds, per layer, rotated keys, values, key positions and the
key mask, plus the layer's prefix keys/values: prompts and prefixes enter it once, at the first
chunk, and later chunks (generated tokens) do not insert them again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.attention import KV, merge_heads, split_heads
from utuning.errors import PlacementError
from utuning.handle import OpHandle
from utuning.slot import Slot

QUANTISED_MERGE = ("its frozen weight is quantised ({kind}); adding a float update to it is not defined. Call "
                   "backbone.dequantize() first to replace the quantised layers by float ones, then merge")


@dataclass
class LayerCache:
    """One layer's cache: keys/values (B, H_kv, N, Dh), key positions (B, N), key mask (B, N)."""

    k: Tensor
    v: Tensor
    pos: Tensor
    valid: Tensor
    prefixes: list[KV] = field(default_factory=list)


class DecoderCache:
    """The KV cache of a re-written decoder (one ``LayerCache`` per layer, filled by the first chunk)."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[LayerCache | None] = [None] * num_layers
        self.next_pos: Tensor | None = None  # (B,) position of each row's next real token
        self.all_valid = True  # no chunk so far had padding: every cached key is a real token (or a prompt)

    @property
    def started(self) -> bool:
        return self.layers[0] is not None

    def update(self, i: int, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor, prefixes: list[KV]) -> LayerCache:
        old = self.layers[i]
        if old is not None:
            k, v = torch.cat([old.k, k], 2), torch.cat([old.v, v], 2)
            pos, valid, prefixes = torch.cat([old.pos, pos], 1), torch.cat([old.valid, valid], 1), old.prefixes
        self.layers[i] = LayerCache(k, v, pos, valid, prefixes)
        return self.layers[i]

    def reorder(self, rows: Tensor) -> None:
        """Keep the given batch rows (e.g. beams)."""
        for entry in self.layers:
            if entry is not None:
                entry.k, entry.v = entry.k[rows], entry.v[rows]
                entry.pos, entry.valid = entry.pos[rows], entry.valid[rows]
                entry.prefixes = [(pk[rows], pv[rows]) for pk, pv in entry.prefixes]
        if self.next_pos is not None:
            self.next_pos = self.next_pos[rows]


@dataclass
class Context:
    """What every layer of one forward shares: the chunk's real-token positions and mask, the
    rotary angles of the real tokens, and the cache."""

    pos: Tensor  # (B, N) long: positions of the chunk's tokens (pads: a neighbour's position)
    valid: Tensor  # (B, N) bool: True for real tokens
    rotary: tuple[Tensor, Tensor] | None  # cos, signed sin (B, N, Dh) (``signed_angles``), Llama family only
    cache: DecoderCache | None = None
    decoding: bool = False  # the cache already holds the sequence start: do not insert prompts again
    # Every token real and no cache: without prompts or prefixes the mask is plain causal, and SDPA
    # gets ``is_causal`` instead of a (B, 1, T, T) mask (which it would copy to float per layer).
    all_real: bool = False
    # Decoding one token per row with every key so far real and within the window: the query sees every
    # cached key, and (without prefixes) SDPA gets no mask at all, as HF's one-token decoding steps.
    sees_all: bool = False
    last_pos: int = 0  # with ``sees_all``: the chunk's highest position (a sliding window must cover 0..last_pos)


# torch >= 2.5: scaled_dot_product_attention takes grouped-query keys/values as they are (enable_gqa).
SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, *, groups: int = 1,
                     prefixes: list[KV] = (), decomposed: bool = False, dropout_p: float = 0.0,
                     scale: float | None = None, causal: bool = True) -> Tensor:
    """Attention of q (B, H, Nq, Dh) over k, v (B, H / ``groups``, Nk, Dh) (grouped-query: each key/value
    head serves ``groups`` consecutive query heads) where ``allowed`` (B, 1, Nq, Nk) is True (None, no
    prefixes: plain causal, or every key with ``causal=False``), and over learned prefixes (each
    (B, H, P, Dh), always visible).
    ``decomposed`` computes ``(1 - λ)·Attn(Q, K, V) + λ·Attn(Q, K_pre, V_pre)`` (U-Tuning, arXiv
    2303.00690, Eq. 3-5)."""
    prefixes = [(pk.to(q.dtype), pv.to(q.dtype)) for pk, pv in prefixes]
    k, v = k.to(q.dtype), v.to(q.dtype)
    if not decomposed or not prefixes:
        if prefixes:
            n_pre = sum(p[0].shape[2] for p in prefixes)
            k, v = join_heads([p[0] for p in prefixes], k, groups), join_heads([p[1] for p in prefixes], v, groups)
            allowed = torch.cat([allowed.new_ones(*allowed.shape[:3], n_pre).expand(-1, -1, q.shape[2], -1),
                                 allowed.expand(-1, -1, q.shape[2], -1)], dim=-1)
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale,
                                              is_causal=causal and allowed is None)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for k_g, v_g, m_g in [(k, v, allowed)] + [(pk, pv, None) for pk, pv in prefixes]:
        logits = (q @ k_g.transpose(-2, -1)) * scale  # (B, H, Nq, Ng)
        if m_g is not None:
            logits = logits.masked_fill(~m_g, float("-inf"))
        lses.append(logits.logsumexp(dim=-1, keepdim=True))  # (B, H, Nq, 1)
        outs.append(F.dropout(logits.softmax(dim=-1), p=dropout_p, training=dropout_p > 0) @ v_g)
    total = torch.logsumexp(torch.stack(lses), dim=0)
    return sum(torch.exp(lse - total) * out for lse, out in zip(lses, outs))  # λ_g = exp(lse_g - lse_total)


def join_heads(prefixes: list[Tensor], kv: Tensor, groups: int) -> Tensor:
    """Prefix keys (or values), each (B, H, P, Dh), in front of grouped keys kv (B, H / groups, N, Dh)
    repeated to the H query heads: (B, H, sum P + N, Dh), written in one copy (no repeated copy first)."""
    b, h_kv, n, d = kv.shape
    parts = [p.unflatten(1, (h_kv, groups)) for p in prefixes] + [kv[:, :, None].expand(b, h_kv, groups, n, d)]
    return torch.cat([t.expand(b, *t.shape[1:]) for t in parts], dim=3).flatten(1, 2)


def signed_angles(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF's rotary (cos, sin) (B, N, Dh) -> (cos, sin with its first half negated), what ``rotate``
    takes: computed once per forward and shared by every layer."""
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary embedding (Su et al. 2021, arXiv 2104.09864) in HF's half-split layout: x (B, H, N, Dh),
    cos and ``signed_angles``' sin (B, N, Dh). HF's ``x·cos + cat(-x2, x1)·sin`` to the bit, as
    ``x·cos + cat(x2, x1)·cat(-sin1, sin2)`` (one roll instead of two slices, a negation and a cat)."""
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin[:, None]


_FUSED_NORM_EXACT: dict[tuple[type, str], bool] = {}


def rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """A Llama-family RMSNorm module applied to x: torch's fused ``rms_norm`` kernel (one pass forward
    and backward instead of six element-wise operations) where it gives the module's own bits for
    float32 on this device, checked once per norm class and device type on a probe; the module otherwise."""
    w = getattr(norm, "weight", None)
    if x.dtype != torch.float32 or w is None or w.dtype != torch.float32 or not hasattr(norm, "variance_epsilon"):
        return norm(x)
    key = (type(norm), x.device.type)
    if key not in _FUSED_NORM_EXACT:
        with torch.no_grad():
            probe = torch.randn(8, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(x.device) * 3
            _FUSED_NORM_EXACT[key] = torch.equal(norm(probe), F.rms_norm(probe, w.shape, w, norm.variance_epsilon))
    return F.rms_norm(x, w.shape, w, norm.variance_epsilon) if _FUSED_NORM_EXACT[key] else norm(x)


def chunk_positions(x: Tensor, ctx: Context, mask: Tensor) -> Tensor:
    """Positions (B, T) of the T = P + N tokens entering an operation: -P..-1 for the P prompt
    tokens at the start, then the chunk's real-token positions."""
    p = x.shape[1] - ctx.pos.shape[1]
    if p == 0:
        return ctx.pos
    lead = torch.arange(-p, 0, device=x.device).expand(x.shape[0], -1)
    return torch.cat([lead, ctx.pos], dim=1)


def visible(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor, window: int | None) -> Tensor:
    """(B, 1, Nq, Nk) bool: real keys at positions <= the query's (within ``window`` real positions)."""
    ok = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # (B, Nq, Nk)
    if window is not None:
        ok = ok & ((k_pos[:, None, :] < 0) | (q_pos[:, :, None] - k_pos[:, None, :] < window))
    return ok[:, None]


def around(slot: Slot, x: Tensor, op: Callable, mask: Tensor, ctx: Context,
           handle: OpHandle | None = None) -> tuple[Tensor, Tensor]:
    """``slot.around``, except in chunks after the first (``ctx.decoding``): no prompts are inserted
    (their keys and values are in the cache already), and tuners that choose positions
    (``takes_mask``: LoReFT's first / last real tokens) are told that no token of the chunk belongs
    to the input sequence, so they edit the prompt's positions only (as pyreft), never generated tokens."""
    if not ctx.decoding:
        return slot.around(x, op, mask, handle)
    replace = slot.of("replace")
    y = replace[-1](x, slot.handle if handle is None else handle) if replace else op(x, mask)
    if not (slot.of("parallel") or slot.of("sequential")):
        return y, mask
    return slot.beside(x, y, torch.zeros_like(mask), handle), mask


def is_quantised(layer: nn.Module) -> str | None:
    """The kind of quantised weight a linear layer holds (torchao / bitsandbytes), or None."""
    w = getattr(layer, "weight", None)
    return None if w is None or type(w) in (nn.Parameter, Tensor) else type(w).__name__


class Conv1DLinear:
    """HF's ``Conv1D`` (GPT-2) seen as an ``nn.Linear`` by reparam tuners: ``weight`` is the
    (out, in) transposed view of Conv1D's (in, out) weight, sharing its storage, so ``merge``
    writes into the frozen Conv1D weight."""

    def __init__(self, conv: nn.Module) -> None:
        self.conv = conv
        self.in_features, self.out_features = conv.weight.shape

    @property
    def weight(self) -> Tensor:
        return self.conv.weight.T

    @weight.setter
    def weight(self, value: Tensor) -> None:  # ``op.linear.weight += d`` updates the view in place, then sets it
        if value.data_ptr() != self.conv.weight.data_ptr():
            with torch.no_grad():
                self.conv.weight.copy_(value.T)

    @property
    def bias(self) -> Tensor | None:
        return self.conv.bias

    @bias.setter
    def bias(self, value: Tensor) -> None:  # ``op.linear.bias += d`` (in place on the bias itself)
        if value is not self.conv.bias:
            with torch.no_grad():
                self.conv.bias.copy_(value)


class DecoderLinearHandle(OpHandle):
    """A linear site: the frozen layer, looked up in its parent at each use, so that
    ``dequantize()`` can replace a quantised layer; merging into a quantised layer is refused."""

    def __init__(self, site: str, parent: nn.Module, attr: str) -> None:  # no OpHandle.__init__: modules is live
        self.site, self.parent, self.attr = site, parent, attr

    @property
    def layer(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    @property
    def modules(self) -> dict[str, nn.Module]:  # type: ignore[override]
        return {"": self.layer}

    def named_parameters(self):
        yield from self.layer.named_parameters()

    @property
    def linear(self) -> nn.Linear | Conv1DLinear:
        layer, kind = self.layer, is_quantised(self.layer)
        if kind is not None:
            raise PlacementError(f"Site {self.site!r}: " + QUANTISED_MERGE.format(kind=kind))
        return Conv1DLinear(layer) if type(layer).__name__ == "Conv1D" else layer


class DecoderOpHandle(OpHandle):
    """An attn / block operation: frozen query and key/value projections of the operation's
    input (through the pre-attention norm and the linear sites, un-rotated, GQA keys repeated to
    all heads), as prompt tokens at the start of the sequence get them. The attn site also offers
    the query rotated at the current call's positions, key/value projections without the pre-norm
    and the output projection's linear part (``adaption_prompt``, LLaMA-Adapter's form)."""

    def __init__(self, site: str, modules: dict, layer: nn.Module, ctx: Context | None = None) -> None:
        super().__init__(site, modules)
        self.layer = layer
        self.ctx = ctx  # the call this handle is bound to (``at``), for ``rotary_query``

    def at(self, ctx: Context) -> DecoderOpHandle:
        """This handle bound to one forward call (its positions), passed to the slot for that call only."""
        return type(self)(self.site, self.modules, self.layer, ctx)

    def query(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, H, N, Dh)
        return self.layer.project(self.layer.attn_norm(x))[0]

    def key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:  # (B, P, D) -> two (B, H, P, Dh)
        tokens = tokens.to(self.layer.attn_norm_weight().dtype)  # float32 tuner tokens, bf16/fp64 frozen weights
        _, k, v = self.layer.project(self.layer.attn_norm(tokens))
        return self.layer.repeat(k), self.layer.repeat(v)

    def rotary_query(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, Dh), rotated as the layer's queries
        if self.ctx is None:
            raise PlacementError(f"Site {self.site!r}: the rotary query exists only during the layer's forward "
                                 "(it depends on the call's positions)")
        cos, sin = self.layer._angles(self.ctx, x.shape[1])
        return rotate(self.query(x), cos, sin)

    def raw_key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:  # (B, P, D) -> two (B, H, P, Dh), no pre-norm
        _, k, v = self.layer.project(tokens.to(self.layer.attn_norm_weight().dtype))
        return self.layer.repeat(k), self.layer.repeat(v)

    def out_proj(self, heads: Tensor) -> Tensor:  # (B, T, H*Dh) -> (B, T, D): W_o without bias
        return self.layer.out_linear(heads)


class DecoderLayer(nn.Module):
    """Shared part of the re-written layers: slots, the block / attn / mlp operations, the cache."""

    def __init__(self, index: int, slots: dict[str, Slot], window: int | None) -> None:
        super().__init__()
        self.index = index
        self.slots = slots  # plain dict: the slots are registered once, in the backbone adapter
        self.window = window

    def forward(self, x: Tensor, mask: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:  # (B, T, D), (B, T)
        return around(self.slots["block"], x, lambda t, m: self._block(t, m, ctx), mask, ctx)

    def _block(self, x: Tensor, mask: Tensor, ctx: Context) -> Tensor:
        attn = self.slots["attn"]  # its handle bound to this call: ``rotary_query`` reads the call's positions
        handle = attn.handle.at(ctx) if len(attn) else None
        x = x + around(attn, x, lambda t, m: self._attn_op(t, m, ctx), mask, ctx, handle)[0]
        return x + around(self.slots["mlp"], x, lambda t, m: self._mlp_op(t), mask, ctx)[0]

    def _attn_op(self, x: Tensor, mask: Tensor, ctx: Context) -> Tensor:
        h = self.attn_norm(x)
        q, k, v = self.project(h)  # (B, H, T, Dh), (B, H_kv, T, Dh) x2
        if ctx.rotary is not None:
            cos, sin = self._angles(ctx, x.shape[1])
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        slot = self.slots["attn"]
        if ctx.decoding:
            prefixes, decomposed = ctx.cache.layers[self.index].prefixes, False
        else:
            prefixes, decomposed = slot.prefixes(x.shape[0])
        # Every token real, no prompt, prefix or cache (``all_real``: no cache) and within the window: plain causal.
        plain = ctx.all_real and not prefixes and x.shape[1] == ctx.pos.shape[1] and (
            self.window is None or x.shape[1] <= self.window)
        allowed = None  # (B, 1, T, T_k); None: causal (``plain``) or every key (``sees_all``)
        if not plain:
            pos = chunk_positions(x, ctx, mask)  # (B, T)
            k_pos, k_valid = pos, mask
            if ctx.cache is not None:
                entry = ctx.cache.update(self.index, k, v, pos, mask, prefixes)
                k, v, k_pos, k_valid = entry.k, entry.v, entry.pos, entry.valid
            sees_all = ctx.sees_all and not prefixes and (self.window is None or ctx.last_pos < self.window)
            if not sees_all:
                allowed = visible(pos, k_pos, k_valid, self.window)
        if not prefixes and self.groups > 1 and SDPA_GQA:  # grouped keys/values go in unrepeated (no copies kept)
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed, is_causal=plain,
                                               dropout_p=self.attn_dropout_p(), scale=self.scale, enable_gqa=True)
        else:
            o = causal_attention(q, k, v, allowed, groups=self.groups, prefixes=prefixes, decomposed=decomposed,
                                 dropout_p=self.attn_dropout_p(), scale=self.scale, causal=plain)
        return self.out(merge_heads(o))  # (B, T, D)

    def _angles(self, ctx: Context, t: int) -> tuple[Tensor, Tensor]:
        """cos / signed sin (B, T, Dh): zero angle (cos 1, sin 0) for the prompt tokens at the start."""
        cos, sin = ctx.rotary
        p = t - cos.shape[1]
        if p == 0:
            return cos, sin
        b, _, d = cos.shape
        return torch.cat([cos.new_ones(b, p, d), cos], 1), torch.cat([sin.new_zeros(b, p, d), sin], 1)

    def repeat(self, kv: Tensor) -> Tensor:
        """Grouped-query keys/values (B, H_kv, N, Dh) -> (B, H, N, Dh)."""
        return kv if self.groups == 1 else kv.repeat_interleave(self.groups, dim=1)

    groups = 1


class LlamaLayer(DecoderLayer):
    """A Llama / Mistral / Qwen2 / Qwen3 decoder layer with operation slots."""

    def __init__(self, layer: nn.Module, index: int, slots: dict[str, Slot], window: int | None) -> None:
        super().__init__(index, slots, window)
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        a = layer.self_attn
        self.head_dim, self.groups, self.scale = a.head_dim, a.num_key_value_groups, a.scaling
        self.qk_norm = hasattr(a, "q_norm")
        self.train(layer.training)

    def attn_norm(self, x: Tensor) -> Tensor:
        return rms_norm(self.input_layernorm, x)

    def attn_norm_weight(self) -> Tensor:
        return self.input_layernorm.weight

    def project(self, h: Tensor) -> list[Tensor]:
        """q (B, H, N, Dh), k, v (B, H_kv, N, Dh) through the linear sites (Qwen3: per-head RMSNorm on q, k)."""
        a, s = self.self_attn, self.slots
        out = []
        for name, layer in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj)):
            t = s[f"attn.{name}"].linear(h, layer)
            t = t.view(*t.shape[:-1], -1, self.head_dim)  # (B, N, heads, Dh)
            if self.qk_norm and name != "v":
                t = rms_norm(a.q_norm if name == "q" else a.k_norm, t)
            out.append(t.transpose(1, 2))
        return out

    def attn_dropout_p(self) -> float:
        return self.self_attn.attention_dropout if self.training else 0.0

    def out(self, o: Tensor) -> Tensor:
        return self.slots["attn.proj"].linear(o, self.self_attn.o_proj)

    def out_linear(self, heads: Tensor) -> Tensor:  # (B, T, H*Dh) -> (B, T, D): the frozen o_proj, no bias
        o = self.self_attn.o_proj
        return o(heads) if o.bias is None else F.linear(heads, o.weight)

    def _mlp_op(self, x: Tensor) -> Tensor:
        m, s = self.mlp, self.slots
        h = rms_norm(self.post_attention_layernorm, x)
        gated = m.act_fn(s["mlp.gate"].linear(h, m.gate_proj)) * s["mlp.up"].linear(h, m.up_proj)  # (B, N, D_ff)
        return s["mlp.down"].linear(gated, m.down_proj)


class GPT2Layer(DecoderLayer):
    """A GPT-2 block with operation slots (no positions inside: GPT-2 adds them at the embedding)."""

    def __init__(self, layer: nn.Module, index: int, slots: dict[str, Slot]) -> None:
        super().__init__(index, slots, None)
        self.ln_1, self.attn, self.ln_2, self.mlp = layer.ln_1, layer.attn, layer.ln_2, layer.mlp
        self.num_heads, self.scale = layer.attn.num_heads, layer.attn.scaling
        self.train(layer.training)

    def attn_norm(self, x: Tensor) -> Tensor:
        return self.ln_1(x)

    def attn_norm_weight(self) -> Tensor:
        return self.ln_1.weight

    def project(self, h: Tensor) -> list[Tensor]:  # three (B, H, N, Dh) from the fused c_attn
        qkv = self.slots["attn.qkv"].linear(h, self.attn.c_attn)  # (B, N, 3D)
        return [split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1)]

    def attn_dropout_p(self) -> float:
        d = self.attn.attn_dropout
        return d.p if d.training else 0.0

    def out(self, o: Tensor) -> Tensor:
        return self.attn.resid_dropout(self.slots["attn.proj"].linear(o, self.attn.c_proj))

    def out_linear(self, heads: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D): Conv1D's (in, out) weight, no bias
        return heads @ self.attn.c_proj.weight.to(heads.dtype)

    def _mlp_op(self, x: Tensor) -> Tensor:
        m, s = self.mlp, self.slots
        h = m.act(s["mlp.fc1"].linear(self.ln_2(x), m.c_fc))  # (B, N, D_ff)
        return m.dropout(s["mlp.fc2"].linear(h, m.c_proj))
