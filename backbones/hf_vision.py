"""Hugging Face vision transformers: ``ViTModel`` / ``ViTForImageClassification``, ``Dinov2Model``
(and ``Dinov2WithRegistersModel``), ``CLIPVisionModel`` and ``SiglipVisionModel`` (registered as ``hf_vision``).

All of them are pre-norm ViTs whose layers differ only in attribute names, so one re-written layer,
``VisionLayer``, serves them through ``FAMILIES`` (a table keyed by ``config.model_type``), keeping
each HF layer's submodules under their original names (``state_dict`` keys do not change)::

    x = x + attn_op(x)   # attn_op(x) = drop(ls1(o_proj(Attn(q/k/v_proj(norm1(x))))))  + its tuners
    x = x + mlp_op(x)    # mlp_op(x)  = drop(ls2(fc2(act(fc1(norm2(x))))))            + its tuners

(``drop``: ViT's hidden dropout or DINOv2's drop path; ``ls``: DINOv2's layer scale.) ``pixel_values``
in; the sites are the timm ViT adapter's, with separate query/key/value linears as in the text adapter:
``embed`` (patch + position embeddings, and CLIP's ``pre_layrnorm``; prompts go after the class and
register tokens),
``blocks.{i}``, ``.attn``, ``.mlp``, ``.attn.q|k|v|proj``, ``.mlp.fc1|fc2`` (DINOv2's SwiGLU FFN:
``.mlp.fc1_g|fc1_x|fc2`` for its gate / up / down projections), ``norm`` (the final LayerNorm over all
tokens: ViT/DINOv2 ``layernorm``, CLIP/SigLIP ``post_layernorm``) and ``head``.

Pooling and head, as HF computes them: the pooled features are the normed class token (ViT, DINOv2,
CLIP: HF's ``pooler_output`` of CLIP is exactly this) or, for SigLIP (no class token), its
attention-pooling head over the normed tokens (its ``pooler_output``; without that head, the mean of the
normed tokens). The ``head`` operation is the
classifier of ``ViTForImageClassification``, ViT's optional pooler (dense + tanh), and the identity
otherwise (a base model returns its pooled features; attach ``linear_probe`` with ``num_classes``).
Side tuners read ``intermediates`` from this adapter's own layer loop (HF records hidden states by
hooks on its layer classes, which the re-written layers replace).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from utuning.attention import attend, merge_heads, split_heads
from utuning.backbone import Backbone, Features, refuse
from utuning.backbones.eva import OP_PLACEMENTS, require
from utuning.backbones.hf_export import HFFolderExport
from utuning.errors import ConfigError, UnknownNameError, closest
from utuning.handle import OpHandle
from utuning.registry import register_backbone
from utuning.sites import SiteSpec
from utuning.slot import Slot, remove_tokens


@dataclass(frozen=True)
class Family:
    """What differs between the supported families: classes, and attribute names by role."""

    base: type  # the vision encoder, e.g. ViTModel
    classifier: type | None  # its image-classification model, whose ``base_attr`` is the encoder
    base_attr: str | None
    layer: type  # the HF layer class that is re-written
    layers: str  # path of the layer list in the encoder
    norm1: str
    attn: str
    proj: str  # the attention's output projection
    scale: str  # the attention's softmax scale attribute
    dropout: str  # the attention's dropout probability attribute
    norm2: str
    final_norm: str
    pre_norm: str | None = None  # CLIP's pre_layrnorm, part of embed
    residual_drop: str | None = None  # ViT: dropout after each branch
    drop_path: str | None = None  # DINOv2: stochastic depth after each branch
    layer_scale: tuple[str, str] | None = None  # DINOv2: LayerScale modules
    class_token: bool = True
    register_tokens: str | None = None  # config field: register tokens after the class token (DINOv2-reg)


_M = tf.models
FAMILIES: dict[str, Family] = {
    "vit": Family(tf.ViTModel, tf.ViTForImageClassification, "vit", _M.vit.modeling_vit.ViTLayer, "layers",
                  "layernorm_before", "attention", "o_proj", "scaling", "attention_dropout", "layernorm_after",
                  "layernorm", residual_drop="dropout"),
    "dinov2": Family(tf.Dinov2Model, None, None, _M.dinov2.modeling_dinov2.Dinov2Layer, "encoder.layer", "norm1",
                     "attention", "o_proj", "scaling", "attention_dropout", "norm2", "layernorm",
                     drop_path="drop_path", layer_scale=("layer_scale1", "layer_scale2")),
    "dinov2_with_registers": Family(tf.Dinov2WithRegistersModel, None, None,
                                    _M.dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersLayer,
                                    "encoder.layer", "norm1", "attention", "o_proj", "scaling", "attention_dropout",
                                    "norm2", "layernorm", drop_path="drop_path",
                                    layer_scale=("layer_scale1", "layer_scale2"), register_tokens="num_register_tokens"),
    "clip_vision_model": Family(tf.CLIPVisionModel, None, None, _M.clip.modeling_clip.CLIPEncoderLayer,
                                "encoder.layers", "layer_norm1", "self_attn", "out_proj", "scale", "dropout",
                                "layer_norm2", "post_layernorm", pre_norm="pre_layrnorm"),
    "siglip_vision_model": Family(tf.SiglipVisionModel, None, None, _M.siglip.modeling_siglip.SiglipEncoderLayer,
                                  "encoder.layers", "layer_norm1", "self_attn", "out_proj", "scale", "dropout",
                                  "layer_norm2", "post_layernorm", class_token=False),
}
#: FFN linears by role: GELU/QuickGELU MLP (fc1, act, fc2) and DINOv2's SwiGLU (gate, up, down).
_MLP = {"mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_SWIGLU = {"mlp.fc1_g": "gate_proj", "mlp.fc1_x": "up_proj", "mlp.fc2": "down_proj"}


def _identity(x: Tensor) -> Tensor:
    return x


class VisionOpHandle(OpHandle):
    """A layer operation: its frozen modules, and the layer's frozen q/k/v projections after ``norm``
    (the operation's own pre-norm: ``norm1`` for ``blocks.{i}`` and ``.attn``, ``norm2`` for ``.mlp``)."""

    def __init__(self, site: str, modules: dict[str, Any], norm: nn.Module, attn: nn.Module, heads: int,
                 proj: nn.Linear | None = None) -> None:
        super().__init__(site, {k: v for k, v in modules.items() if v is not None})
        self.norm, self.attn, self.heads, self.proj = norm, attn, heads, proj

    def query(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, H, N, Dh)
        return split_heads(self.attn.q_proj(self.norm(x)), self.heads)

    def key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:  # (B, P, D) -> two (B, H, P, Dh)
        t = self.norm(tokens)
        return split_heads(self.attn.k_proj(t), self.heads), split_heads(self.attn.v_proj(t), self.heads)

    def raw_key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:  # attn sites: no pre-norm
        return split_heads(self.attn.k_proj(tokens), self.heads), split_heads(self.attn.v_proj(tokens), self.heads)

    def out_proj(self, heads: Tensor) -> Tensor:  # attn sites: (B, N, H*Dh) -> (B, N, D), ls1 ∘ W_o, no bias
        o = F.linear(heads, self.proj.weight)
        return self.modules["ls1"](o) if "ls1" in self.modules else o


class VisionLayer(nn.Module):
    """A pre-norm HF vision layer with operation slots; the HF submodules keep their names."""

    def __init__(self, layer: nn.Module, family: Family, slots: dict[str, Slot], heads: int) -> None:
        super().__init__()
        f = family
        self.roles = {"norm1": f.norm1, "attn": f.attn, "norm2": f.norm2, "mlp": "mlp", "drop": f.residual_drop
                      or f.drop_path, "ls1": f.layer_scale and f.layer_scale[0], "ls2": f.layer_scale and f.layer_scale[1]}
        for name in filter(None, self.roles.values()):
            setattr(self, name, getattr(layer, name))
        self.family, self.heads = family, heads
        self.slots = slots  # plain dict: the slots are registered once, in the backbone adapter
        self.swiglu = hasattr(self.mlp, "gate_proj")
        self.train(layer.training)

    def _part(self, role: str) -> Callable[[Tensor], Tensor]:
        name = self.roles[role]
        return getattr(self, name) if name else _identity

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D)
        return self.slots["block"].apply(x, self._block)

    def _block(self, x: Tensor, mask: Tensor | None) -> Tensor:
        drop = self._part("drop")  # part of the frozen operation, as in the timm adapters
        x = x + self.slots["attn"].apply(x, lambda t, _: drop(self._part("ls1")(self._attn_op(t))))
        return x + self.slots["mlp"].apply(x, lambda t, _: drop(self._part("ls2")(self._mlp_op(t))))

    def _attn_op(self, x: Tensor) -> Tensor:
        a, s, f = self._part("attn"), self.slots, self.family
        h = self._part("norm1")(x)
        q, k, v = (split_heads(s[f"attn.{n}"].linear(h, getattr(a, f"{n}_proj")), self.heads) for n in "qkv")
        prefixes, decomposed = s["attn"].prefixes(x.shape[0])
        drop = getattr(a, f.dropout) if self.training else 0.0
        o = attend(q, k, v, prefixes=prefixes, decomposed=decomposed, dropout_p=drop, scale=getattr(a, f.scale))
        return s["attn.proj"].linear(merge_heads(o), getattr(a, f.proj))  # (B, N, D)

    def _mlp_op(self, x: Tensor) -> Tensor:
        m, s, h = self.mlp, self.slots, self._part("norm2")(x)
        if self.swiglu:
            h = m.act_fn(s["mlp.fc1_g"].linear(h, m.gate_proj)) * s["mlp.fc1_x"].linear(h, m.up_proj)
            return s["mlp.fc2"].linear(h, m.down_proj)
        return s["mlp.fc2"].linear(m.activation_fn(s["mlp.fc1"].linear(h, m.fc1)), m.fc2)


def _family(model: nn.Module) -> Family | None:
    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    if family is None or not isinstance(model, tuple(c for c in (family.base, family.classifier) if c)):
        return None
    return family


def _check(base: nn.Module, family: Family) -> None:
    """Every class and attribute the re-written forward reads, refused by name before anything changes."""
    require(base, ("embeddings", family.final_norm) + ((family.pre_norm,) if family.pre_norm else ()), type(base).__name__)
    for i, layer in enumerate(base.get_submodule(family.layers)):
        where = f"{family.layers}.{i}"
        if type(layer) is not family.layer:
            raise refuse(f"{where} is a {type(layer).__name__}", f"only {family.layer.__name__} is re-written")
        roles = (family.norm1, family.attn, family.norm2, "mlp", family.residual_drop, family.drop_path,
                 *(family.layer_scale or ()))
        require(layer, tuple(filter(None, roles)), where)
        extra = set(dict(layer.named_children())) - set(filter(None, roles))
        if extra:
            raise refuse(f"{where} has extra submodules {sorted(extra)}", "the re-written forward would skip them")
        require(getattr(layer, family.attn), ("q_proj", "k_proj", "v_proj", family.proj, family.scale, family.dropout),
                f"{where}.{family.attn}")
        mlp = layer.mlp
        require(mlp, ("gate_proj", "up_proj", "down_proj", "act_fn") if hasattr(mlp, "gate_proj") else
                ("fc1", "fc2", "activation_fn"), f"{where}.mlp")
    if family.layer_scale:
        require(base.get_submodule(family.layers)[0].layer_scale1, ("lambda1",), f"{family.layers}.0.layer_scale1")


@register_backbone("hf_vision")
class HFVisionBackbone(HFFolderExport, Backbone):
    """HF ViT / DINOv2 / CLIP / SigLIP vision encoders with the ViT adapter's sites (q/k/v separate).
    ``forward(pixel_values)`` -> logits (classifier models) or pooled features (B, D)."""

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return _family(model) is not None

    @classmethod
    def create(cls, *, model: str = "vit", pretrained: bool = False, num_classes: int | None = None,
               img_size: int | None = None, **config_overrides: Any) -> HFVisionBackbone:
        """Build from a hub name / local folder (weights with ``pretrained=True``) or, with
        ``pretrained=False``, a model type in ``FAMILIES`` and config overrides (how the tests build
        tiny models offline). ``num_classes`` builds ``ViTForImageClassification`` (ViT only; the other
        families are encoders: attach ``linear_probe`` with ``num_classes`` instead); ``img_size`` sets the
        config's ``image_size`` (position embeddings of that size: new ones unless the checkpoint has them)."""
        model, overrides = str(model), dict(config_overrides)
        if img_size is not None:
            overrides["image_size"] = img_size
        from_type = model in FAMILIES and not Path(model).is_dir()
        if from_type and pretrained:
            raise ConfigError(f"model={model!r} is a model type, which has no weights; give a hub name or a folder")
        try:
            config = tf.AutoConfig.for_model(model) if from_type else tf.AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"Cannot read a config for model={model!r} (hub name, local folder, or one of "
                              f"{sorted(FAMILIES)}): {e}") from e
        config = getattr(config, "vision_config", config)  # a CLIP / SigLIP checkpoint: its vision tower
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise UnknownNameError(f"model={model!r} is a {config.model_type!r} model; hf_vision wraps "
                                   f"{sorted(FAMILIES)} (closest: {closest(config.model_type, FAMILIES)})")
        unknown = sorted(set(overrides) - set(config.to_dict()))
        if unknown:
            raise ConfigError(f"Unknown {config.model_type} config field {unknown[0]!r}; did you mean "
                              f"{closest(unknown[0], config.to_dict())}?")
        for key, value in overrides.items():
            setattr(config, key, value)
        if num_classes is not None:
            if family.classifier is None:
                raise ConfigError(f"{family.base.__name__} has no classifier; build it without num_classes and "
                                  f"attach linear_probe with num_classes={num_classes}")
            config.num_labels = num_classes
        net_cls = family.classifier if num_classes is not None else family.base
        net = net_cls.from_pretrained(model, config=config) if pretrained else net_cls(config)
        return cls(net)

    def __init__(self, model: nn.Module) -> None:
        family = _family(model)
        if family is None:
            raise refuse(f"A {type(model).__name__}", f"hf_vision wraps {[f.base.__name__ for f in FAMILIES.values()]} "
                         "and ViTForImageClassification")
        base = getattr(model, family.base_attr) if family.base_attr and not isinstance(model, family.base) else model
        _check(base, family)  # all checks before anything is modified
        super().__init__(model)
        self.family, self.base = family, [base]  # plain list: the encoder stays registered under self.model only
        config = base.config
        dim, heads = config.hidden_size, config.num_attention_heads
        npt = int(family.class_token) + (getattr(config, family.register_tokens) if family.register_tokens else 0)
        self.prefix_tokens = npt  # class and register tokens: prompts go after them
        patch = config.patch_size
        info = {"patch_size": tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)}
        # The embeddings' parts, less the mask token of masked-image pre-training (unused here).
        emb = base.embeddings
        embed = {f"embeddings.{n}": p for n, p in emb.named_parameters(recurse=False) if n != "mask_token"}
        embed |= {f"embeddings.{n}": c for n, c in emb.named_children()}
        embed["pre_norm"] = getattr(base, family.pre_norm) if family.pre_norm else None
        self.add_site(SiteSpec("embed", "embed", dim, frozenset({"prompt", "unfreeze"}), prefix_tokens=npt, info=info),
                      OpHandle("embed", {k: v for k, v in embed.items() if v is not None}))
        layers = base.get_submodule(family.layers)
        for i, layer in enumerate(layers):
            layers[i] = VisionLayer(layer, family, self._layer_slots(i, layer, heads, npt, info), heads)
        norm_mods = {"norm": getattr(base, family.final_norm), "pool": getattr(base, "head", None)}
        self.add_site(SiteSpec("norm", "norm", dim, frozenset({"unfreeze"})),
                      OpHandle("norm", {k: v for k, v in norm_mods.items() if v is not None}))
        head = self._head_module()
        out_dim = head.out_features if isinstance(head, nn.Linear) else getattr(getattr(head, "dense", None),
                                                                                 "out_features", dim)
        self.add_site(SiteSpec("head", "head", dim, frozenset({"replace", "unfreeze"}), out_dim=out_dim),
                      OpHandle("head", {"head": head} if head is not None else {}))

    def _head_module(self) -> nn.Module | None:
        if self.family.classifier is not None and isinstance(self.model, self.family.classifier):
            return self.model.classifier
        return getattr(self.base[0], "pooler", None)  # ViTModel's optional pooler (dense + tanh)

    def _layer_slots(self, i: int, layer: nn.Module, heads: int, npt: int, info: dict) -> dict[str, Slot]:
        f, dim, p = self.family, self.base[0].config.hidden_size, f"blocks.{i}"
        attn, norm1, norm2 = getattr(layer, f.attn), getattr(layer, f.norm1), getattr(layer, f.norm2)
        ls = [getattr(layer, n) for n in f.layer_scale] if f.layer_scale else [None, None]
        common = {"layer": i, "num_heads": heads, "head_dim": attn.q_proj.out_features // heads, "prefix_tokens": npt,
                  "features": frozenset({"query", "key_value", "spatial"}), "info": info}
        mods_attn, mods_mlp = {"norm1": norm1, "attn": attn, "ls1": ls[0]}, {"norm2": norm2, "mlp": layer.mlp, "ls2": ls[1]}
        slots = {
            "block": self.add_site(SiteSpec(p, "block", dim, OP_PLACEMENTS | {"prompt"}, **common),
                                   VisionOpHandle(p, {**mods_attn, **mods_mlp}, norm1, attn, heads)),
            "attn": self.add_site(SiteSpec(f"{p}.attn", "attn", dim, OP_PLACEMENTS | {"prefix"},
                                           **{**common, "features": common["features"] | {"raw_key_value", "out_proj"}}),
                                  VisionOpHandle(f"{p}.attn", mods_attn, norm1, attn, heads, getattr(attn, f.proj))),
            "mlp": self.add_site(SiteSpec(f"{p}.mlp", "mlp", dim, OP_PLACEMENTS, **common),
                                 VisionOpHandle(f"{p}.mlp", mods_mlp, norm2, attn, heads)),
        }
        linears = {f"attn.{n}": getattr(attn, f"{n}_proj") for n in "qkv"} | {"attn.proj": getattr(attn, f.proj)}
        ffn = _SWIGLU if hasattr(layer.mlp, "gate_proj") else _MLP
        linears |= {site: getattr(layer.mlp, name) for site, name in ffn.items()}
        for name, lin in linears.items():
            slots[name] = self.add_linear_site(f"{p}.{name}", lin, index=i)
        return slots

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    # Running ----------------------------------------------------------------------------
    def _pool(self, final: Tensor) -> Tensor:  # (B, N, D) -> (B, D)
        base = self.base[0]
        if self.family.class_token:
            return final[:, 0]
        return base.head(final) if getattr(base, "use_head", False) else final.mean(dim=1)

    def head(self, pooled: Tensor) -> Tensor:  # (B, D) -> (B, C) or (B, D)
        head = self._head_module()
        if head is None:
            return self.slot("head").apply(pooled, lambda t, _: t)
        if isinstance(head, nn.Linear):
            return self.slot("head").apply(pooled, lambda t, _: head(t))
        return self.slot("head").apply(pooled, lambda t, _: head.activation(head.dense(t)))

    def forward(self, pixel_values: Tensor) -> Tensor:  # (B, 3, H, W)
        return self.head(self.intermediates(pixel_values, layers=[]).pooled)

    def intermediates(self, pixel_values: Tensor, *, layers: list[int]) -> Features:
        """Layer outputs (class token kept, kept prompts removed), the normed tokens and the pooled features."""
        base, f = self.base[0], self.family
        x = base.embeddings(pixel_values.to(base.embeddings.patch_embeddings.projection.weight.dtype)
                            if hasattr(base.embeddings, "patch_embeddings") else pixel_values)
        if f.pre_norm:
            x = getattr(base, f.pre_norm)(x)
        n_tokens, npt, wanted, inter = x.shape[1], self.prefix_tokens, set(layers), {}
        x = self.slot("embed").around(x, lambda t, _: t)[0]
        for i, layer in enumerate(base.get_submodule(f.layers)):
            x = checkpoint(layer, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else layer(x)
            if i in wanted:
                inter[i] = remove_tokens(x, x.shape[1] - n_tokens, npt)[0]
        x = remove_tokens(x, x.shape[1] - n_tokens, npt)[0]
        final = self.slot("norm").apply(x, lambda t, _: getattr(base, f.final_norm)(t))
        return Features(inter, final, self._pool(final), None, {"prefix_tokens": npt})

    def example_inputs(self, batch_size: int = 2) -> dict[str, Tensor]:
        c = self.base[0].config
        size = c.image_size if isinstance(c.image_size, (tuple, list)) else (c.image_size, c.image_size)
        return {"pixel_values": torch.randn(batch_size, c.num_channels, *size)}
