"""timm ``Beit``: BEiT (Bao et al. 2021, arXiv 2106.08254) with relative position bias and layer scale.

Each ``Block`` is re-written as ``BeitTunedBlock`` (the frozen ``norm1, attn, gamma_1, norm2, mlp,
gamma_2`` keep their names, so ``state_dict`` keys do not change)::

    x = x + attn_op(x)   # attn_op(x) = drop_path1(gamma_1 * attn(norm1(x)))  + its tuners
    x = x + mlp_op(x)    # mlp_op(x)  = drop_path2(gamma_2 * mlp(norm2(x)))  + its tuners

Sites are the timm ViT adapter's (``embed``, ``blocks.{i}``, ``.attn``, ``.mlp``, ``.attn.qkv``,
``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``, ``norm``, ``head``). The attention adds BEiT's relative
position bias (the block's own table and/or the model's shared one) to the scores of the class and
patch tokens. Prompt tokens (inserted after the class token) and learned prefix keys have no relative
position: the bias between them and every other token is zero, so prefix attention keeps U-Tuning's
exact parallel form ``(1 - λ)·Attn(Q, K, V; bias) + λ·Attn(Q, K_pre, V_pre)`` and VPT-deep equals
``prompt_parallel``. The frozen query a parallel tuner reads (``p_prefix``, ``p_prompt``) is the block's
``W_q`` after the site's pre-norm; attention over learned keys has no bias. As in EVA, timm keeps the
qkv bias outside the layer (``q_bias``, ``k_bias``, ``v_bias``): the ``attn.qkv`` site is the bias-free
layer and the bias is added after its tuners (see ``backbones/eva.py``, whose block this one extends).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit, Block
from torch import Tensor, nn

from utuning.attention import KV, attend
from utuning.backbone import refuse
from utuning.backbones.eva import PreNormOpHandle, PreNormTimmBackbone, PreNormTunedBlock, check_mlp, require
from utuning.backbones.vit import create_timm_model
from utuning.handle import OpHandle
from utuning.registry import register_backbone


def pad_bias(bias: Tensor, n: int, after: int) -> Tensor:
    """Zero rows and columns for the ``n - N0`` tokens inserted after the first ``after`` of a (…, N0, N0) bias."""
    extra = n - bias.shape[-1]
    if extra == 0:
        return bias
    rows = bias.new_zeros(*bias.shape[:-2], extra, bias.shape[-1])
    bias = torch.cat([bias[..., :after, :], rows, bias[..., after:, :]], dim=-2)  # (…, N, N0)
    cols = bias.new_zeros(*bias.shape[:-1], extra)
    return torch.cat([bias[..., :after], cols, bias[..., after:]], dim=-1)  # (…, N, N)


def attend_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, *, prefixes: list[KV] = (),
                     decomposed: bool = False, dropout_p: float = 0.0, scale: float | None = None) -> Tensor:
    """``utuning.attend`` with an additive score bias (…, N, N) on the frozen keys; learned prefix keys
    get none. q, k, v: (B, H, N, Dh); returns (B, H, N, Dh). ``decomposed`` gives the exact parallel form."""
    if bias is None:
        return attend(q, k, v, prefixes=prefixes, decomposed=decomposed, dropout_p=dropout_p, scale=scale)
    bias = bias if bias.dtype == q.dtype else bias.to(q.dtype)
    if not decomposed or not prefixes:
        if prefixes:
            k = torch.cat([p[0] for p in prefixes] + [k], dim=2)
            v = torch.cat([p[1] for p in prefixes] + [v], dim=2)
            bias = F.pad(bias, (sum(p[0].shape[2] for p in prefixes), 0))  # zero bias for the prefix keys
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for k_g, v_g, b_g in [(k, v, bias)] + [(pk, pv, None) for pk, pv in prefixes]:
        logits = (q @ k_g.transpose(-2, -1)) * scale  # (B, H, N, N_g)
        if b_g is not None:
            logits = logits + b_g
        lses.append(logits.logsumexp(dim=-1, keepdim=True))  # (B, H, N, 1)
        outs.append(F.dropout(logits.softmax(dim=-1), p=dropout_p, training=dropout_p > 0) @ v_g)
    total = torch.logsumexp(torch.stack(lses), dim=0)
    return sum(torch.exp(lse - total) * out for lse, out in zip(lses, outs))  # λ_g-weighted, as in attend


class BeitTunedBlock(PreNormTunedBlock):
    """A BEiT ``Block`` with slots: relative position bias (``ctx`` = the shared bias, or None)."""

    def forward(self, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
        return self.run(x, shared_rel_pos_bias)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: Tensor | None, prefixes: list, decomposed: bool) -> Tensor:
        a = self.attn
        bias = a._get_rel_pos_bias() if a.relative_position_bias_table is not None else None  # (1, H, N0, N0)
        if ctx is not None:
            bias = ctx if bias is None else bias + ctx
        if bias is not None:
            bias = pad_bias(bias, q.shape[2], self.slots["attn"].spec.prefix_tokens)
        drop = a.attn_drop.p if self.training else 0.0
        return attend_with_bias(q, k, v, bias, prefixes=prefixes, decomposed=decomposed, dropout_p=drop, scale=a.scale)


def _check_block(i: int, block: nn.Module) -> None:
    where = f"blocks.{i}"
    if type(block) is not Block:
        raise refuse(f"{where} is a {type(block).__name__}", "only timm's BEiT `Block` is re-written exactly")
    require(block, PreNormTunedBlock.names, where)
    if type(block.attn) is not BeitAttention:
        raise refuse(f"{where}.attn is a {type(block.attn).__name__}", "only timm's BEiT `Attention` is re-written")
    require(block.attn, ("qkv", "q_bias", "k_bias", "v_bias", "num_heads", "scale", "attn_drop", "proj", "proj_drop",
                         "relative_position_bias_table", "_get_rel_pos_bias"), f"{where}.attn")
    check_mlp(where, block.mlp)


@register_backbone("beit")
class BeitBackbone(PreNormTimmBackbone):
    """timm ``Beit`` with the ViT adapter's sites; see the module docstring."""

    block_class = BeitTunedBlock

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, Beit)

    @classmethod
    def create(cls, *, model: str = "beit_base_patch16_224", pretrained: bool | str = False,
               num_classes: int | None = None, img_size: int | None = None, **timm_kwargs: Any) -> BeitBackbone:
        """Build a timm BEiT by name; ``pretrained``: False, True or a local weights file/folder."""
        return cls(create_timm_model(model, pretrained, num_classes, img_size, suggest="beit*", **timm_kwargs))

    def __init__(self, model: Beit) -> None:
        if not isinstance(model, Beit):
            raise refuse(f"A {type(model).__name__}", "the beit backbone wraps timm Beit models")
        require(model, ("patch_embed", "cls_token", "pos_embed", "pos_drop", "rel_pos_bias", "blocks", "norm",
                        "forward_head", "head", "num_prefix_tokens", "grad_checkpointing", "embed_dim", "num_features"),
                "the Beit model")
        for i, block in enumerate(model.blocks):
            _check_block(i, block)  # all checks before anything is modified
        super().__init__(model)

        def handle(site: str, mods: dict, norm: nn.Module, attn: nn.Module, layer: int) -> OpHandle:
            return PreNormOpHandle(site, mods, norm, attn)

        embed = {"patch_embed": model.patch_embed, "cls_token": model.cls_token, "pos_embed": model.pos_embed,
                 "rel_pos_bias": model.rel_pos_bias}
        self._add_sites(model, handle, embed, frozenset({"query", "key_value"}), {})

    def _embed(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        m = self.model
        x = m.patch_embed(pixel_values)  # (B, N_patches, D)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        return m.pos_drop(x), m.rel_pos_bias() if m.rel_pos_bias is not None else None
