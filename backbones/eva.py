"""timm ``Eva``: EVA-02 (arXiv 2303.11331) and the RoPE ViTs (Heo et al. 2024, arXiv 2403.13298).

Each ``EvaBlock`` is re-written as ``EvaTunedBlock``: the frozen submodules and layer-scale vectors keep
their names (``norm1, attn, gamma_1, norm2, mlp, gamma_2``), so ``state_dict`` keys do not change::

    x = x + attn_op(x)   # attn_op(x) = drop_path1(gamma_1 * attn(norm1(x), rope))  + its tuners
    x = x + mlp_op(x)    # mlp_op(x)  = drop_path2(gamma_2 * mlp(norm2(x)))        + its tuners

Sites are the timm ViT adapter's (``embed``, ``blocks.{i}``, ``.attn``, ``.mlp``, ``.attn.qkv``,
``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``, ``norm``, ``head``); separate query/key/value projections
(``qkv_fused=False``: EVA-02 S/B/L) are ``.attn.q``, ``.attn.k``, ``.attn.v`` as in the text adapter; a SwiGLU FFN with separate gate and
input layers (timm ``SwiGLU``, EVA-02 B/L) has ``.mlp.fc1_g`` and ``.mlp.fc1_x`` instead of ``.mlp.fc1``;
the packed SwiGLU of EVA-02 Ti/S (timm ``GluMlp``) keeps one ``.mlp.fc1`` holding both halves.

Rotary position embeddings rotate the queries and keys of the *patch* tokens only, as timm does:
class and register tokens, prompt tokens (inserted after them, so the patches stay last) and learned
prefix keys/values (``prefix``, ``prompt_parallel``, ``p_prefix``, ``p_prompt``) carry no position
and are never rotated. The frozen query a parallel tuner reads (``handle.query``) is rotated like the
block's own queries, so ``p_prompt`` computes the prompt term of ``prompt_parallel``'s exact parallel
form; it needs the same rotation on every call, so models whose RoPE changes from call to call
(``dynamic_img_size``, patch dropout, train-time coordinate augmentation) refuse ``query`` with the
reason. timm keeps the bias of EVA's fused ``qkv`` outside the layer (``q_bias``, a zero ``k_bias``
buffer, ``v_bias``); the ``attn.qkv`` site is the bias-free ``nn.Linear`` and the attention adds that
bias after the site's tuners, so every reparam tuner sees (and merges into) exactly the layer timm
stores: LoRA-style weight updates merge, while BitFit and SSF, which merge into a layer bias, are
refused at ``merge()`` with the reason (they still train), and SSF / IA3 scale ``W x`` before the frozen
bias is added. With no active (unmerged) tuner there, the block runs timm's own fused
``F.linear(x, W, b)``: untuned, the adapters execute exactly timm's tensor operations (tested). Block variants the forward does not reproduce (post-norm, gated or grouped-query
attention) are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.layers.attention import AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from utuning.attention import attend, merge_heads, split_heads
from utuning.backbone import Backbone, Features, refuse
from utuning.backbones.vit import create_timm_model
from utuning.handle import OpHandle
from utuning.registry import register_backbone
from utuning.sites import SiteSpec
from utuning.slot import Slot, remove_tokens

OP_PLACEMENTS = frozenset({"parallel", "sequential", "unfreeze"})
_MLPS = (Mlp, GluMlp, SwiGLU)


def require(obj: Any, names: tuple[str, ...], where: str) -> None:
    """Refuse a model part lacking an attribute the re-written forward reads (a changed library version)."""
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise refuse(f"{where} ({type(obj).__name__}) lacks {missing}",
                     "the re-written forward reads them; this library version's layers differ from the tested ones")


# The fused qkv and its split bias --------------------------------------------------------------
def split_qkv_bias(attn: nn.Module) -> Tensor | None:
    """The qkv bias that EVA / BEiT keep outside the qkv layer (``q_bias``, zero ``k_bias``, ``v_bias``),
    as one (3·H·Dh,) tensor; None when the layer holds its own bias (or there is none)."""
    if getattr(attn, "q_bias", None) is None:
        return None
    return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))


class PreNormOpHandle(OpHandle):
    """A block operation of a pre-norm timm block with a fused qkv: its frozen modules, and the block's
    frozen query / key-value projections applied after ``norm`` (the operation's own pre-norm).
    ``rope()`` gives the rotation of the patch queries (None: no rotation)."""

    def __init__(self, site: str, modules: dict[str, Any], norm: nn.Module, attn: nn.Module,
                 rope: Callable[[], Tensor | None] = lambda: None) -> None:
        super().__init__(site, {k: v for k, v in modules.items() if v is not None})
        self.norm, self.attn, self.rope = norm, attn, rope

    def _project(self, x: Tensor, index: int, norm: bool = True) -> Tensor:
        a, d = self.attn, self.attn.num_heads * head_dim(self.attn)
        x = self.norm(x) if norm else x
        if a.qkv is None:  # separate q/k/v projections (EVA-02 B/L)
            return split_heads(getattr(a, f"{'qkv'[index]}_proj")(x), a.num_heads)
        bias = split_qkv_bias(a) if a.qkv.bias is None else a.qkv.bias
        w, b = a.qkv.weight[index * d:(index + 1) * d], None if bias is None else bias[index * d:(index + 1) * d]
        return split_heads(F.linear(x, w, b), a.num_heads)  # (B, H, N, Dh)

    def query(self, x: Tensor) -> Tensor:
        q = maybe(self.attn, "q_norm", self._project(x, 0))
        rope = self.rope()
        return q if rope is None else rotate_patches(q, rope, self.attn.rotate_half)

    def key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return maybe(self.attn, "k_norm", self._project(tokens, 1)), self._project(tokens, 2)

    def raw_key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:  # attn sites: without norm1
        k = maybe(self.attn, "k_norm", self._project(tokens, 1, norm=False))
        return k, self._project(tokens, 2, norm=False)

    def out_proj(self, heads: Tensor) -> Tensor:  # attn sites: (B, N, H·Dh) -> (B, N, D), gamma_1 · W_o, no bias
        o = F.linear(heads, self.attn.proj.weight)
        gamma = self.modules.get("gamma_1")
        return o if gamma is None else gamma * o


def acts(module: nn.Module, name: str) -> bool:
    """Whether ``module.name`` changes its input: False where it is absent, None or an ``nn.Identity``
    (BEiT's attention has no q/k or head norm; EVA-02's are identities)."""
    sub = getattr(module, name, None)
    return sub is not None and type(sub) is not nn.Identity


def maybe(module: nn.Module, name: str, x: Tensor) -> Tensor:
    """``module.name(x)``, or ``x`` where that submodule does not act (see ``acts``)."""
    return getattr(module, name)(x) if acts(module, name) else x


def attn_features(attn: nn.Module) -> frozenset[str]:
    """``raw_key_value`` / ``out_proj`` of attn sites (``adaption_prompt``): W_o is linear in the merged
    heads only without EVA's head norm before it (``scale_attn_inner``)."""
    return frozenset({"raw_key_value"} if acts(attn, "norm") else {"raw_key_value", "out_proj"})


def head_dim(attn: nn.Module) -> int:
    """Width of one head (BEiT's ``Attention`` keeps no ``head_dim``)."""
    if getattr(attn, "qkv", None) is None:
        return attn.q_proj.out_features // attn.num_heads
    return attn.qkv.out_features // (3 * attn.num_heads)


def rotate_patches(t: Tensor, rope: Tensor, half: bool) -> Tensor:
    """Rotate the last ``rope.shape[-2]`` tokens (the patches) of ``t`` (B, H, N, Dh); the leading class,
    register and prompt tokens keep no position, as timm leaves its prefix tokens."""
    n = rope.shape[-2]
    return torch.cat([t[:, :, :-n], apply_rot_embed_cat(t[:, :, -n:], rope, half=half)], dim=2).type_as(t)


# The re-written block -------------------------------------------------------------------------
class PreNormTunedBlock(nn.Module):
    """A timm pre-norm block with a fused qkv and optional layer scale (EVA, BEiT) and operation slots.

    ``ctx`` is what the family's attention reads besides the tokens (EVA: the RoPE; BEiT: the shared
    relative position bias); subclasses implement ``_position`` / ``_attend`` for it."""

    names = ("norm1", "attn", "gamma_1", "drop_path1", "norm2", "mlp", "gamma_2", "drop_path2")

    def __init__(self, block: nn.Module, slots: dict[str, Slot]) -> None:
        super().__init__()
        for name in self.names:
            setattr(self, name, getattr(block, name))  # Parameters (gamma) and modules keep their names
        self.slots = slots  # plain dict: the slots are registered once, in the backbone adapter
        self.mlp_kind = type(self.mlp).__name__
        # Read once, as timm's own forward would call them: BEiT's attention has no q/k or head norm and
        # EVA-02's are identities, which the untuned forward then neither looks up nor calls.
        a = self.attn
        self.qk_norm = acts(a, "q_norm") or acts(a, "k_norm")
        self.head_norm = acts(a, "norm")
        self.train(block.training)

    def run(self, x: Tensor, ctx: Tensor | None) -> Tensor:  # (B, N, D)
        return self.slots["block"].apply(x, lambda t, _: self._block(t, ctx))

    def _block(self, x: Tensor, ctx: Tensor | None) -> Tensor:
        # Stochastic depth belongs to the frozen operation (as in the ViT adapter).
        x = x + self.slots["attn"].apply(x, lambda t, _: self.drop_path1(self._attn_op(t, ctx)))
        return x + self.slots["mlp"].apply(x, lambda t, _: self.drop_path2(self._mlp_op(t)))

    def _position(self, q: Tensor, k: Tensor, ctx: Tensor | None) -> tuple[Tensor, Tensor]:
        return q, k

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: Tensor | None, prefixes: list, decomposed: bool) -> Tensor:
        drop = self.attn.attn_drop.p if self.training else 0.0
        return attend(q, k, v, prefixes=prefixes, decomposed=decomposed, dropout_p=drop, scale=self.attn.scale)

    def _heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (each (B, H, N, Dh)) of the normed tokens through the linear sites."""
        a = self.attn
        if a.qkv is None:  # separate projections: sites attn.q / attn.k / attn.v
            b, n = h.shape[:2]  # reshape, as timm's forward: the same (view) operation
            return tuple(self.slots[f"attn.{p}"].linear(h, getattr(a, f"{p}_proj")).reshape(b, n, a.num_heads, -1)
                         .transpose(1, 2) for p in "qkv")  # 3 x (B, H, N, Dh)
        slot, bias = self.slots["attn.qkv"], split_qkv_bias(a)
        if bias is not None and all(t.merged for t in slot.of("reparam")):
            qkv = F.linear(h, a.qkv.weight, bias)  # no active tuner: timm's own W x + b, one addmm
        else:
            qkv = slot.linear(h, a.qkv)  # (B, N, 3·H·Dh)
            if bias is not None:  # EVA / BEiT: added after the site's tuners (see the module docstring)
                qkv = qkv + bias
        b, n, _ = qkv.shape
        return qkv.reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)

    def _attn_op(self, x: Tensor, ctx: Tensor | None) -> Tensor:
        a = self.attn
        q, k, v = self._heads(self.norm1(x))
        if self.qk_norm:
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = self._position(q, k, ctx)
        prefixes, decomposed = self.slots["attn"].prefixes(x.shape[0])
        o = merge_heads(self._attend(q, k, v, ctx, prefixes, decomposed))  # (B, N, H·Dh)
        o = a.proj_drop(self.slots["attn.proj"].linear(a.norm(o) if self.head_norm else o, a.proj))
        return o if self.gamma_1 is None else self.gamma_1 * o

    def _mlp_op(self, x: Tensor) -> Tensor:
        m, s, h = self.mlp, self.slots, self.norm2(x)
        if self.mlp_kind == "SwiGLU":
            h = m.act(s["mlp.fc1_g"].linear(h, m.fc1_g)) * s["mlp.fc1_x"].linear(h, m.fc1_x)  # (B, N, F)
        elif self.mlp_kind == "GluMlp":
            h1, h2 = s["mlp.fc1"].linear(h, m.fc1).chunk(2, dim=-1)  # packed halves, each (B, N, F)
            h = h1 * m.act(h2) if m.gate_last else m.act(h1) * h2
        else:
            h = m.act(s["mlp.fc1"].linear(h, m.fc1))
        o = m.drop2(s["mlp.fc2"].linear(m.norm(m.drop1(h)), m.fc2))
        return o if self.gamma_2 is None else self.gamma_2 * o


class EvaTunedBlock(PreNormTunedBlock):
    """An ``EvaBlock`` with slots: RoPE on the patch queries/keys (``ctx`` = the rotation, or None)."""

    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise refuse("Masked or causal attention in a tuned EVA block", "utuning's blocks attend over all tokens")
        return self.run(x, rope)

    def _position(self, q: Tensor, k: Tensor, ctx: Tensor | None) -> tuple[Tensor, Tensor]:
        if ctx is None:
            return q, k
        half = self.attn.rotate_half
        return rotate_patches(q, ctx, half), rotate_patches(k, ctx, half)


def check_mlp(where: str, mlp: nn.Module) -> None:
    if type(mlp) not in _MLPS:
        raise refuse(f"{where}.mlp is a {type(mlp).__name__}", f"only timm's {[c.__name__ for c in _MLPS]} are re-written")
    linears = ("fc1_g", "fc1_x", "fc2") if type(mlp) is SwiGLU else ("fc1", "fc2")
    require(mlp, linears + ("act", "drop1", "norm", "drop2"), f"{where}.mlp")
    if not all(isinstance(getattr(mlp, n), nn.Linear) for n in linears):
        raise refuse(f"{where}.mlp uses 1x1 convolutions", "only linear FFNs are re-written")


def _check_block(i: int, block: nn.Module) -> None:
    where = f"blocks.{i}"
    if type(block) is not EvaBlock:
        raise refuse(f"{where} is a {type(block).__name__}", "only timm's pre-norm `EvaBlock` is re-written exactly")
    require(block, PreNormTunedBlock.names, where)
    a = block.attn
    if type(a) not in (EvaAttention, AttentionRope):
        raise refuse(f"{where}.attn is a {type(a).__name__}", "only timm's `EvaAttention` / `AttentionRope` are re-written")
    require(a, ("qkv", "num_heads", "scale", "q_norm", "k_norm", "norm", "gate", "proj", "attn_drop",
                "proj_drop", "rotate_half", "num_prefix_tokens"), f"{where}.attn")
    if a.qkv is None:
        require(a, ("q_proj", "k_proj", "v_proj"), f"{where}.attn")
    if a.gate is not None:
        raise refuse(f"{where}.attn is gated", "gated attention is not re-written")
    if getattr(a, "num_kv_groups", 1) != 1:
        raise refuse(f"{where}.attn uses grouped-query attention", "only full multi-head attention is re-written")
    check_mlp(where, block.mlp)


def query_refusal(model: nn.Module) -> str | None:
    """Why the RoPE of ``model`` cannot be reproduced outside its forward (None: it can)."""
    if model.rope is None:
        return None
    if model.dynamic_img_size:
        return "with dynamic_img_size the RoPE grid follows each input's size, which a parallel tuner's query cannot see"
    if model.patch_drop is not None:
        return "patch dropout keeps a random subset of rotated positions per call, which the handle cannot reproduce"
    if getattr(model.rope, "aug_active", False):
        return "train-time RoPE coordinate augmentation draws new positions per call, which the handle cannot reproduce"
    return None


# The backbone ---------------------------------------------------------------------------------
class PreNormTimmBackbone(Backbone):
    """What the EVA and BEiT adapters share: sites, the token loop, norm, pooling and head."""

    block_class: type[PreNormTunedBlock] = PreNormTunedBlock

    def _add_sites(self, model: nn.Module, handle: Callable[[str, dict, nn.Module, nn.Module, int], OpHandle],
                   embed_modules: dict[str, Any], features: frozenset[str], refused: dict[str, str]) -> None:
        dim, npt = model.embed_dim, model.num_prefix_tokens
        patch = model.patch_embed.patch_size
        info = {"patch_size": tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)}
        self.add_site(SiteSpec("embed", "embed", dim, frozenset({"prompt", "unfreeze"}), prefix_tokens=npt, info=info),
                      OpHandle("embed", {k: v for k, v in embed_modules.items() if v is not None}))
        for i, block in enumerate(model.blocks):
            a, p = block.attn, f"blocks.{i}"
            common = {"layer": i, "num_heads": a.num_heads, "head_dim": head_dim(a), "prefix_tokens": npt,
                      "features": features | {"spatial"}, "refused": refused, "info": info}
            attn_mods = {"norm1": block.norm1, "attn": a, "gamma_1": block.gamma_1}
            mlp_mods = {"norm2": block.norm2, "mlp": block.mlp, "gamma_2": block.gamma_2}
            slots = {
                "block": self.add_site(SiteSpec(p, "block", dim, OP_PLACEMENTS | {"prompt"}, **common),
                                       handle(p, {**attn_mods, **mlp_mods}, block.norm1, a, i)),
                "attn": self.add_site(SiteSpec(f"{p}.attn", "attn", dim, OP_PLACEMENTS | {"prefix"},
                                               **{**common, "features": common["features"] | attn_features(a)}),
                                      handle(f"{p}.attn", attn_mods, block.norm1, a, i)),
                "mlp": self.add_site(SiteSpec(f"{p}.mlp", "mlp", dim, OP_PLACEMENTS, **common),
                                     handle(f"{p}.mlp", mlp_mods, block.norm2, a, i)),
            }
            m = block.mlp
            qkv = {"attn.qkv": a.qkv} if a.qkv is not None else {f"attn.{n}": getattr(a, f"{n}_proj") for n in "qkv"}
            linears = {**qkv, "attn.proj": a.proj, **{f"mlp.{n}": getattr(m, n) for n in ("fc1", "fc1_g", "fc1_x", "fc2")
                                              if isinstance(getattr(m, n, None), nn.Linear)}}
            for name, layer in linears.items():
                slots[name] = self.add_linear_site(f"{p}.{name}", layer, index=i, split=3 if name == "attn.qkv" else 1)
            model.blocks[i] = self.block_class(block, slots)
        self.add_site(SiteSpec("norm", "norm", dim, frozenset({"unfreeze"})),
                      OpHandle("norm", {n: getattr(model, n) for n in ("norm", "fc_norm", "attn_pool")
                                        if getattr(model, n, None) is not None}))
        head_out = model.head.out_features if isinstance(model.head, nn.Linear) else dim
        self.add_site(SiteSpec("head", "head", model.num_features, frozenset({"replace", "unfreeze"}), out_dim=head_out),
                      OpHandle("head", {"head": model.head}))

    # Running ----------------------------------------------------------------------------
    def _embed(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """Tokens (B, N, D) before the blocks, and what every block's attention reads besides them."""
        raise NotImplementedError

    def _block_ctx(self, i: int, ctx: Tensor | None) -> Tensor | None:
        return ctx

    def forward(self, pixel_values: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, classes)
        return self.head(self.intermediates(pixel_values, layers=[]).pooled)

    def feature_options(self) -> dict[str, Any]:
        return {"global_pool": getattr(self.model, "global_pool", None)}

    def head(self, pooled: Tensor) -> Tensor:  # (B, D) -> (B, classes)
        return self.slot("head").apply(pooled, lambda t, _: self.model.head(t))

    def intermediates(self, pixel_values: Tensor, *, layers: list[int]) -> Features:
        """Block outputs (class/register tokens kept, kept prompts removed) on the path ``forward`` takes."""
        m, wanted, npt = self.model, set(layers), self.model.num_prefix_tokens
        x, ctx = self._embed(pixel_values)
        n_tokens = x.shape[1]
        x, inter = self.slot("embed").around(x, lambda t, _: t)[0], {}
        recompute = m.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(m.blocks):
            c = self._block_ctx(i, ctx)
            x = checkpoint(block.run, x, c, use_reentrant=False) if recompute else block.run(x, c)
            if i in wanted:
                inter[i] = remove_tokens(x, x.shape[1] - n_tokens, npt)[0]
        x = remove_tokens(x, x.shape[1] - n_tokens, npt)[0]
        final = self.slot("norm").apply(x, lambda t, _: m.norm(t))
        return Features(inter, final, m.forward_head(final, pre_logits=True), None, {"prefix_tokens": npt})

    def example_inputs(self, batch_size: int = 2) -> dict[str, Tensor]:
        pe = self.model.patch_embed
        return {"pixel_values": torch.randn(batch_size, pe.proj.in_channels, *pe.img_size)}


@register_backbone("eva")
class EvaBackbone(PreNormTimmBackbone):
    """timm ``Eva`` (EVA-02, RoPE ViTs) with the ViT adapter's sites; see the module docstring."""

    block_class = EvaTunedBlock

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    @classmethod
    def create(cls, *, model: str = "eva02_tiny_patch14_224", pretrained: bool | str = False,
               num_classes: int | None = None, img_size: int | None = None, **timm_kwargs: Any) -> EvaBackbone:
        """Build a timm EVA / RoPE-ViT by name; ``pretrained``: False, True or a local weights file/folder."""
        return cls(create_timm_model(model, pretrained, num_classes, img_size, suggest="*eva*", **timm_kwargs))

    def __init__(self, model: Eva) -> None:
        if not isinstance(model, Eva):
            raise refuse(f"A {type(model).__name__}", "the eva backbone wraps timm Eva models")
        require(model, ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "forward_head", "head", "rope",
                        "rope_mixed", "num_prefix_tokens", "dynamic_img_size", "patch_drop", "grad_checkpointing",
                        "embed_dim", "num_features"), "the Eva model")
        for i, block in enumerate(model.blocks):
            _check_block(i, block)  # all checks before anything is modified
        super().__init__(model)
        why = query_refusal(model)
        features = frozenset({"key_value"}) if why else frozenset({"query", "key_value"})

        def handle(site: str, mods: dict, norm: nn.Module, attn: nn.Module, layer: int) -> OpHandle:
            return PreNormOpHandle(site, mods, norm, attn, rope=lambda: self._fixed_rope(layer))

        embed = {"patch_embed": model.patch_embed, "cls_token": model.cls_token, "reg_token": model.reg_token,
                 "pos_embed": model.pos_embed, "rope": model.rope, "norm_pre": model.norm_pre}
        self._add_sites(model, handle, embed, features, {"query": why} if why else {})

    def _fixed_rope(self, layer: int) -> Tensor | None:
        """The rotation the patch queries of block ``layer`` get (fixed grid, no augmentation)."""
        m = self.model
        if m.rope is None:
            return None
        rope = m.rope.get_embed() if hasattr(m.rope, "feat_shape") else m.rope.get_embed(shape=m.patch_embed.grid_size)
        return rope[layer] if m.rope_mixed else rope

    def _embed(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        m = self.model
        x, rope = m._pos_embed(m.patch_embed(pixel_values))  # (B, N, D), the patches' rotation
        return m.norm_pre(x), rope

    def _block_ctx(self, i: int, ctx: Tensor | None) -> Tensor | None:
        return ctx[i] if ctx is not None and self.model.rope_mixed else ctx
