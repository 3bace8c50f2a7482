"""timm Vision Transformers (ViT, DeiT, CLIP-ViT, with class and register tokens).

Each timm ``Block`` is re-written as ``ViTBlock``: the same frozen submodules under the same
names (so ``state_dict`` keys do not change), called through slots::

    x = x + attn_op(x)     # attn_op(x) = drop_path1(ls1(attn(norm1(x))))  + its tuners
    x = x + mlp_op(x)      # mlp_op(x)  = drop_path2(ls2(mlp(norm2(x))))   + its tuners

Block variants this forward does not reproduce exactly (parallel blocks, post-norm blocks,
gated attention, GLU MLPs...) are refused with an error naming the part.

Frozen query projections for parallel attention tuners (``p_prefix``, ``p_prompt``): every
site uses its block's frozen ``W_q`` (and ``W_k``, ``W_v``), applied after the site's own
pre-norm: ``norm1`` for ``blocks.{i}.attn`` and ``blocks.{i}``, ``norm2`` for ``blocks.{i}.mlp``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from utuning.attention import attend, merge_heads, split_heads
from utuning.backbone import Backbone, Features, refuse
from utuning.errors import ConfigError, UnknownNameError, closest
from utuning.handle import OpHandle
from utuning.registry import register_backbone
from utuning.sites import SiteSpec
from utuning.slot import Slot, remove_tokens
from utuning.versions import require

_BLOCK_CHILDREN = {"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"}
_OP_PLACEMENTS = frozenset({"parallel", "sequential", "unfreeze"})
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pt", "model.pth")


class ViTOpHandle(OpHandle):
    """A block operation: its frozen modules, and the block's frozen attention projections
    applied after ``norm`` (the operation's pre-norm)."""

    def __init__(self, site: str, modules: dict[str, Any], norm: nn.Module, attn: Attention) -> None:
        super().__init__(site, modules)
        self.norm = norm
        self.attn = attn

    def _project(self, x: Tensor, index: int, norm: bool = True) -> Tensor:
        a = self.attn
        w = a.qkv.weight[index * a.attn_dim : (index + 1) * a.attn_dim]
        b = None if a.qkv.bias is None else a.qkv.bias[index * a.attn_dim : (index + 1) * a.attn_dim]
        return split_heads(F.linear(self.norm(x) if norm else x, w, b), a.num_heads)  # (B, H, N, Dh)

    def query(self, x: Tensor) -> Tensor:
        return self.attn.q_norm(self._project(x, 0))

    def key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.attn.k_norm(self._project(tokens, 1)), self._project(tokens, 2)

    def raw_key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:  # attn sites: no norm1
        return self.attn.k_norm(self._project(tokens, 1, norm=False)), self._project(tokens, 2, norm=False)

    def out_proj(self, heads: Tensor) -> Tensor:  # attn sites: (B, N, H*Dh) -> (B, N, D), ls1 ∘ W_o without bias
        return self.modules["ls1"](F.linear(heads, self.attn.proj.weight))


class ViTBlock(nn.Module):
    """A timm ``Block`` with operation slots; the frozen submodules keep their names."""

    def __init__(self, block: Block, slots: dict[str, Slot]) -> None:
        super().__init__()
        for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self.slots = slots  # plain dict: the slots are registered once, in the backbone adapter

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:  # (B, N, D)
        if attn_mask is not None or is_causal:
            raise refuse("Masked or causal attention in a tuned ViT block", "utuning's ViT blocks attend over all tokens")
        return self.slots["block"].apply(x, self._block)

    def _block(self, x: Tensor, mask: Tensor | None) -> Tensor:
        # Stochastic depth belongs to the frozen operation: a parallel tuner's output is not
        # dropped with it, and a sequential tuner reads the dropped output (as in AdaptFormer).
        x = x + self.slots["attn"].apply(x, self._attn_branch)
        return x + self.slots["mlp"].apply(x, self._mlp_branch)

    def _attn_branch(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.drop_path1(self._attn_op(x, mask))

    def _mlp_branch(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.drop_path2(self._mlp_op(x, mask))

    def _attn_op(self, x: Tensor, mask: Tensor | None) -> Tensor:
        a = self.attn
        qkv = self.slots["attn.qkv"].linear(self.norm1(x), a.qkv)  # (B, N, 3*H*Dh)
        q, k, v = rearrange(qkv, "b n (t h d) -> t b h n d", t=3, h=a.num_heads)
        q, k = a.q_norm(q), a.k_norm(k)
        prefixes, decomposed = self.slots["attn"].prefixes(x.shape[0])
        drop = a.attn_drop.p if self.training else 0.0
        o = attend(q, k, v, prefixes=prefixes, decomposed=decomposed, dropout_p=drop, scale=a.scale)
        o = a.norm(merge_heads(o))  # (B, N, H*Dh)
        return self.ls1(a.proj_drop(self.slots["attn.proj"].linear(o, a.proj)))

    def _mlp_op(self, x: Tensor, mask: Tensor | None) -> Tensor:
        m = self.mlp
        h = m.drop1(m.act(self.slots["mlp.fc1"].linear(self.norm2(x), m.fc1)))
        return self.ls2(m.drop2(self.slots["mlp.fc2"].linear(m.norm(h), m.fc2)))


# Every attribute the re-written forward reads (checked at wrap time: utuning.versions.require).
MODEL_ATTRS = ("blocks", "embed_dim", "num_prefix_tokens", "num_features", "patch_embed", "cls_token", "reg_token",
               "pos_embed", "_pos_embed", "patch_drop", "norm_pre", "norm", "fc_norm", "head", "forward_head",
               "dynamic_img_size", "grad_checkpointing")
PATCH_ATTRS = ("patch_size", "grid_size", "img_size", "proj", "dynamic_feat_size")
ATTN_ATTRS = ("qkv", "num_heads", "attn_dim", "q_norm", "k_norm", "attn_drop", "scale", "norm", "proj", "proj_drop")
MLP_ATTRS = ("fc1", "act", "drop1", "norm", "fc2", "drop2")


def _attn_features(attn: Attention) -> frozenset[str]:
    """``out_proj`` / ``raw_key_value`` of attn sites (``adaption_prompt``): W_o is linear in the heads
    only without timm's optional head norm (``scale_norm``)."""
    return frozenset({"raw_key_value", "out_proj"} if type(attn.norm) is nn.Identity else {"raw_key_value"})


def _check_block(i: int, block: nn.Module) -> None:
    where = f"blocks.{i}"
    if type(block) is not Block:
        raise refuse(f"{where} is a {type(block).__name__}", "only timm's pre-norm `Block` is re-written exactly")
    extra = set(dict(block.named_children())) - _BLOCK_CHILDREN
    if extra:
        raise refuse(f"{where} has extra submodules {sorted(extra)}", "the re-written forward would skip them")
    if type(block.attn) is not Attention:
        raise refuse(f"{where}.attn is a {type(block.attn).__name__}", "only timm's `Attention` is re-written exactly")
    if getattr(block.attn, "gate", None) is not None:
        raise refuse(f"{where}.attn is gated", "gated attention is not re-written")
    if type(block.mlp) is not Mlp or not isinstance(block.mlp.fc1, nn.Linear):
        raise refuse(f"{where}.mlp is a {type(block.mlp).__name__}", "only timm's linear `Mlp` is re-written exactly")
    require(block, _BLOCK_CHILDREN, where=where, library="timm")
    require(block.attn, ATTN_ATTRS, where=f"{where}.attn", library="timm")
    require(block.mlp, MLP_ATTRS, where=f"{where}.mlp", library="timm")


def _weights_file(path: str | Path) -> str:
    path = Path(path).expanduser()
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                return str(path / name)
        raise ConfigError(f"Checkpoint folder {str(path)!r} holds none of {list(_WEIGHT_FILES)}")
    if not path.is_file():
        raise ConfigError(f"Checkpoint {str(path)!r} does not exist")
    return str(path)


def create_timm_model(model: str, pretrained: bool | str = False, num_classes: int | None = None,
                      img_size: int | None = None, *, suggest: str = "*", **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model`` for the timm backbone adapters (``vit``, ``eva``, ``beit``): ``pretrained`` is
    False, True (timm's hub weights) or a local file or folder of weights; an unknown name lists the
    closest timm names matching ``suggest``."""
    import timm

    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    if isinstance(pretrained, (str, Path)) and not isinstance(pretrained, bool):
        kwargs["pretrained_cfg_overlay"] = {"file": _weights_file(pretrained)}
        pretrained = True
    if model not in timm.list_models() and model.split(".")[0] not in timm.list_models():
        raise UnknownNameError(f"Unknown timm model {model!r}. Did you mean {closest(model, timm.list_models(suggest))}?")
    return timm.create_model(model, pretrained=bool(pretrained), **kwargs)


@register_backbone("vit")
class ViTBackbone(Backbone):
    """timm ``VisionTransformer`` with sites embed, blocks.{i}[.attn|.mlp][.qkv|.proj|.fc1|.fc2], norm, head."""

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    @classmethod
    def create(
        cls,
        *,
        model: str = "vit_base_patch16_224",
        pretrained: bool | str = False,
        num_classes: int | None = None,
        img_size: int | None = None,
        **timm_kwargs: Any,
    ) -> ViTBackbone:
        """``pretrained``: False, True (timm's hub weights) or a local file or folder of weights."""
        return cls(create_timm_model(model, pretrained, num_classes, img_size, suggest="vit*", **timm_kwargs))

    def __init__(self, model: VisionTransformer) -> None:
        if not isinstance(model, VisionTransformer):
            raise refuse(f"A {type(model).__name__}", "the vit backbone wraps timm VisionTransformer models")
        require(model, MODEL_ATTRS, where="the model", library="timm")
        require(model.patch_embed, PATCH_ATTRS, where="patch_embed", library="timm")
        for i, block in enumerate(model.blocks):
            _check_block(i, block)  # all checks before anything is modified
        super().__init__(model)
        dim, npt = model.embed_dim, model.num_prefix_tokens
        patch = model.patch_embed.patch_size
        info = {"patch_size": tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)}
        embed_modules = {"patch_embed": model.patch_embed, "cls_token": model.cls_token,
                         "reg_token": model.reg_token, "pos_embed": model.pos_embed}
        self.add_site(
            SiteSpec("embed", "embed", dim, frozenset({"prompt", "unfreeze"}), prefix_tokens=npt, info=info),
            OpHandle("embed", {k: v for k, v in embed_modules.items() if v is not None}),
        )
        for i, block in enumerate(model.blocks):
            model.blocks[i] = ViTBlock(block, self._block_slots(i, block, info))
        self.add_site(SiteSpec("norm", "norm", dim, frozenset({"unfreeze"})),
                      OpHandle("norm", {"norm": model.norm, "fc_norm": model.fc_norm}))
        head_out = model.head.out_features if isinstance(model.head, nn.Linear) else dim
        self.add_site(SiteSpec("head", "head", model.num_features, frozenset({"replace", "unfreeze"}), out_dim=head_out),
                      OpHandle("head", {"head": model.head}))

    def _block_slots(self, i: int, block: Block, info: dict) -> dict[str, Slot]:
        a, dim, npt = block.attn, self.model.embed_dim, self.model.num_prefix_tokens
        common = {"layer": i, "num_heads": a.num_heads, "head_dim": a.head_dim, "prefix_tokens": npt,
                  "features": frozenset({"query", "key_value", "spatial"}), "info": info}
        p = f"blocks.{i}"
        mods_attn = {"norm1": block.norm1, "attn": block.attn, "ls1": block.ls1}
        mods_mlp = {"norm2": block.norm2, "mlp": block.mlp, "ls2": block.ls2}
        slots = {
            "block": self.add_site(SiteSpec(p, "block", dim, _OP_PLACEMENTS | {"prompt"}, **common),
                                   ViTOpHandle(p, {**mods_attn, **mods_mlp}, block.norm1, a)),
            "attn": self.add_site(SiteSpec(f"{p}.attn", "attn", dim, _OP_PLACEMENTS | {"prefix"}, **{**common, "features":
                                  common["features"] | _attn_features(a)}),
                                  ViTOpHandle(f"{p}.attn", mods_attn, block.norm1, a)),
            "mlp": self.add_site(SiteSpec(f"{p}.mlp", "mlp", dim, _OP_PLACEMENTS, **common),
                                 ViTOpHandle(f"{p}.mlp", mods_mlp, block.norm2, a)),
        }
        for name, layer in (("attn.qkv", a.qkv), ("attn.proj", a.proj), ("mlp.fc1", block.mlp.fc1), ("mlp.fc2", block.mlp.fc2)):
            slots[name] = self.add_linear_site(f"{p}.{name}", layer, index=i, split=3 if name == "attn.qkv" else 1)
        return slots

    # Running ----------------------------------------------------------------------------
    def _tokens(self, pixel_values: Tensor) -> Tensor:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixel_values))))  # (B, N, D)
        return self.slot("embed").around(x, lambda t, _: t)[0]

    def _strip(self, x: Tensor, n_tokens: int) -> Tensor:
        # Prompts kept past their block (VPT-shallow) sit after the class/register tokens.
        return remove_tokens(x, x.shape[1] - n_tokens, self.model.num_prefix_tokens)[0]

    def _n_tokens(self, pixel_values: Tensor) -> int:
        h, w = self.model.patch_embed.dynamic_feat_size(pixel_values.shape[-2:]) if self.model.dynamic_img_size \
            else self.model.patch_embed.grid_size
        return self.model.num_prefix_tokens + h * w

    def forward(self, pixel_values: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, classes)
        return self.head(self.intermediates(pixel_values, layers=[]).pooled)  # (B, D) -> (B, classes)

    def feature_options(self) -> dict[str, Any]:
        return {"global_pool": getattr(self.model, "global_pool", None)}

    def head(self, pooled: Tensor) -> Tensor:
        return self.slot("head").apply(pooled, lambda t, _: self.model.head(t))

    def intermediates(self, pixel_values: Tensor, *, layers: list[int]) -> Features:
        """Block outputs (class/register tokens kept) on the path ``forward`` takes to the head, so
        tuners inside the backbone (prompts at ``embed`` included) shape what side tuners read;
        prompts kept past their block are stripped, as before the head."""
        m, wanted = self.model, set(layers)
        n_tokens = self._n_tokens(pixel_values)
        x, inter = self._tokens(pixel_values), {}
        recompute = m.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(m.blocks):
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
            if i in wanted:
                inter[i] = self._strip(x, n_tokens)
        final = self.slot("norm").apply(self._strip(x, n_tokens), lambda t, _: m.norm(t))
        pooled = m.forward_head(final, pre_logits=True)
        return Features(inter, final, pooled, None, {"prefix_tokens": m.num_prefix_tokens})

    def example_inputs(self, batch_size: int = 2) -> dict[str, Tensor]:
        size = self.model.patch_embed.img_size
        return {"pixel_values": torch.randn(batch_size, self.model.patch_embed.proj.in_channels, *size)}
