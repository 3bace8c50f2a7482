"""timm Swin Transformer (v1): shifted-window attention with a relative position bias, and patch
merging between stages (Liu et al. 2021, arXiv 2103.14030).

Hierarchical site names. Blocks are numbered globally across stages, so every pattern written
for a ViT (``blocks.*.attn``, ``blocks.{8..11}``, the compositions) means the same here::

    embed                              patch embedding (conv + norm)
    blocks.{i}                         a whole Swin block, on the tokens of its stage (B, N_s, C_s)
    blocks.{i}.attn                    drop_path1(W-MSA or SW-MSA(norm1(x))): roll, window partition,
                                       attention with the relative position bias (and the shift mask)
    blocks.{i}.mlp                     drop_path2(mlp(norm2(x)))
    blocks.{i}.attn.qkv / .attn.proj / .mlp.fc1 / .mlp.fc2     frozen linear layers
    blocks.{i}.downsample.reduction    the patch-merging linear that opens stage s > 0 (i: the stage's
                                       first block), before its blocks
    norm, head                         final norm, classifier on the pooled features

``stages.{s}`` selects the blocks of stage ``s`` in any pattern: ``stages.1.attn`` is
``blocks.{2..3}.attn`` when stage 1 holds blocks 2 and 3 (``stages.*``, ``stages.{1..2}`` too).
Widths are per site (``SiteSpec.dim`` = the stage's width); ``SiteSpec.info`` holds the stage, its
token grid, window and shift. Full fine-tuning of a stage's first block (``full`` at
``blocks.{i}``) also trains the patch merging that opens the stage, so ``full_finetune`` covers
every parameter; the block's tuners do not see it (it changes width and resolution).

Tuners inside window attention: ``prefix`` and ``prompt_parallel`` learn keys/values shared by
every window; the relative position bias and the shift mask apply to the frozen keys only, and the
exact parallel form holds (``attend_biased``). ``p_prefix`` / ``p_prompt`` attend per token with
the block's frozen ``W_q`` after the site's pre-norm (``norm1`` for attn and block, ``norm2`` for
mlp), as on a ViT. VPT ``prompt`` tokens are refused: attention is per window, so an inserted token
has no window; ``prompt_parallel`` at ``blocks.*.attn`` is VPT-deep's effect on the image tokens
(the same prompts, through the frozen ``norm1`` and key/value weights, in every window).

Not re-written (refused by name): Swin-V2 (post-norm, cosine attention, continuous position bias),
``dynamic_img_size`` models (masks rebuilt per input size), other block or attention classes.
Resize a model (``set_input_size``) before wrapping it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import ClassifierHead, Mlp, PatchEmbed
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from utuning.attention import KV, split_heads
from utuning.backbone import Backbone, Features, refuse
from utuning.errors import SiteError, UnknownNameError, closest
from utuning.handle import OpHandle
from utuning.registry import register_backbone
from utuning.sites import SiteSpec
from utuning.slot import Slot

_BLOCK_CHILDREN = {"norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2"}
_OP_PLACEMENTS = frozenset({"parallel", "sequential", "unfreeze"})
PROMPT_REFUSED = ("Swin attends within local windows, not over one token sequence, so an inserted prompt token has "
                  "no window; use prompt_parallel at blocks.*.attn (the prompts as keys/values in every window, "
                  "VPT-deep's effect on the image tokens) or prefix")


def attend_biased(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, *, prefixes: Sequence[KV] = (),
                  decomposed: bool = False, dropout_p: float = 0.0, scale: float | None = None) -> Tensor:
    """Attention with an additive bias on the frozen keys (relative position bias, shift mask) and
    learned prefixes that get none.

    q, k, v: (..., H, N, Dh); bias broadcasts to (..., H, Nq, N); prefixes (..., H, P, Dh).
    ``decomposed`` computes ``(1 - λ)·Attn(Q, K, V; bias) + λ·Attn(Q, K_pre, V_pre)`` (U-Tuning
    Eq. 3-5), which equals the joint form exactly. Returns (..., H, Nq, Dh).
    """
    if not prefixes:  # timm's own (unfused) window attention, op for op: no copies of q/k/v or the bias
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        probs = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (..., H, Nq, N)
        return F.dropout(probs, p=dropout_p, training=dropout_p > 0) @ v
    if not decomposed:
        n_pre = sum(p[0].shape[-2] for p in prefixes)
        k = torch.cat([p[0] for p in prefixes] + [k], dim=-2)
        v = torch.cat([p[1] for p in prefixes] + [v], dim=-2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(bias, (n_pre, 0)), dropout_p=dropout_p,
                                              scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for k_g, v_g, b_g in [(k, v, bias)] + [(pk, pv, None) for pk, pv in prefixes]:
        logits = (q @ k_g.transpose(-2, -1)) * scale  # (..., H, Nq, Ng)
        if b_g is not None:
            logits = logits + b_g
        lses.append(logits.logsumexp(dim=-1, keepdim=True))
        outs.append(F.dropout(logits.softmax(dim=-1), p=dropout_p, training=dropout_p > 0) @ v_g)
    total = torch.logsumexp(torch.stack(lses), dim=0)
    return sum(torch.exp(lse - total) * out for lse, out in zip(lses, outs))


def _stage_choices(segment: str, count: int, pattern: str) -> list[int]:
    if segment == "*":
        return list(range(count))
    body = segment.strip("{}")
    if ".." in body:
        lo, _, hi = body.partition("..")
        items = list(range(int(lo), int(hi) + 1))
    else:
        items = [int(s) for s in body.split(",")]
    bad = [s for s in items if not 0 <= s < count]
    if bad:
        raise SiteError(f"Site pattern {pattern!r} asks for stage {bad[0]}; this backbone has stages 0..{count - 1}")
    return items


def expand_stages(patterns: str | Sequence[str], stages: Sequence[range]) -> list[str]:
    """Rewrite a leading ``stages.{s}`` (``*``, ``{a..b}``, ``{a,b}``) as the blocks of those stages."""
    out = []
    for p in [patterns] if isinstance(patterns, str) else list(patterns):
        m = re.match(r"stages\.(\*|\d+|\{[\d.,\s]+\})(?=\.|\Z)", p) if isinstance(p, str) else None
        if m is None:
            out.append(p)
            continue
        blocks = [b for s in _stage_choices(m.group(1), len(stages), p) for b in stages[s]]
        out.append("blocks.{" + ",".join(str(b) for b in sorted(set(blocks))) + "}" + p[m.end():])
    return out


class StagedBackbone(Backbone):
    """A hierarchical backbone: ``self.stages`` lists each stage's global block indices, and
    patterns may select a stage with ``stages.{s}``."""

    stages: list[range]

    def match(self, patterns: str | list[str]) -> list[str]:
        return super().match(expand_stages(patterns, self.stages))


class SwinOpHandle(OpHandle):
    """A block operation: its frozen modules, and the block's frozen attention projections of
    tokens (B, N, C) after ``norm`` (the operation's pre-norm)."""

    def __init__(self, site: str, modules: dict[str, Any], norm: nn.Module, attn: WindowAttention) -> None:
        super().__init__(site, modules)
        self.norm, self.attn = norm, attn

    def _project(self, x: Tensor, index: int, norm: bool = True) -> Tensor:
        qkv = self.attn.qkv
        d = qkv.out_features // 3
        b = None if qkv.bias is None else qkv.bias[index * d:(index + 1) * d]
        return split_heads(F.linear(self.norm(x) if norm else x, qkv.weight[index * d:(index + 1) * d], b),
                           self.attn.num_heads)

    def query(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, H, N, Dh)
        return self._project(x, 0)

    def key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:  # (B, P, C) -> two (B, H, P, Dh)
        return self._project(tokens, 1), self._project(tokens, 2)

    def raw_key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:  # attn sites: no norm1
        return self._project(tokens, 1, norm=False), self._project(tokens, 2, norm=False)

    def out_proj(self, heads: Tensor) -> Tensor:  # attn sites: (B, N, H*Dh) -> (B, N, C), W_o per token, no bias
        return F.linear(heads, self.attn.proj.weight)


class SwinBlock(nn.Module):
    """A timm ``SwinTransformerBlock`` with operation slots; the frozen submodules keep their names.
    Takes and returns (B, H, W, C) like timm's block; its slots see tokens (B, H*W, C)."""

    def __init__(self, block: SwinTransformerBlock, slots: dict[str, Slot]) -> None:
        super().__init__()
        for name in ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2"):
            setattr(self, name, getattr(block, name))
        self.window_size, self.shift_size = tuple(block.window_size), tuple(block.shift_size)
        self.register_buffer("attn_mask", block.attn_mask, persistent=False)  # (nW, Wa, Wa) or None
        self.slots = slots  # plain dict: the slots are registered once, in the backbone adapter

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        y = self.slots["block"].apply(x.reshape(b, h * w, c), partial(self._block, grid=(h, w)))
        return y.view(b, h, w, c)

    def _block(self, x: Tensor, mask: Tensor | None, grid: tuple[int, int]) -> Tensor:  # (B, N, C)
        x = x + self.slots["attn"].apply(x, partial(self._attn_branch, grid=grid))
        return x + self.slots["mlp"].apply(x, self._mlp_branch)

    def _attn_branch(self, x: Tensor, mask: Tensor | None, grid: tuple[int, int]) -> Tensor:
        (h, w), (wh, ww), shift = grid, self.window_size, self.shift_size
        t = self.norm1(x).unflatten(1, (h, w))  # (B, H, W, C)
        if any(shift):
            t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        t = F.pad(t, (0, 0, 0, -w % ww, 0, -h % wh))  # to whole windows
        hp = t.shape[1]
        win = rearrange(t, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=wh, ww=ww)  # (B, nW, Wa, C)
        o = rearrange(self._window_attention(win), "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
                      nh=hp // wh, wh=wh, ww=ww)[:, :h, :w]
        if any(shift):
            o = torch.roll(o, shifts=shift, dims=(1, 2))
        return self.drop_path1(o.flatten(1, 2))  # (B, N, C)

    def _window_attention(self, win: Tensor) -> Tensor:  # (B, nW, Wa, C) -> (B, nW, Wa, C)
        a = self.attn
        qkv = self.slots["attn.qkv"].linear(win, a.qkv)  # (B, nW, Wa, 3*H*Dh)
        q, k, v = rearrange(qkv, "b w n (t h d) -> t b w h n d", t=3, h=a.num_heads)  # (B, nW, H, Wa, Dh)
        bias = a._get_rel_pos_bias()  # (1, H, Wa, Wa)
        if self.attn_mask is not None:
            bias = bias + self.attn_mask[:, None].to(bias.dtype)  # (nW, H, Wa, Wa): shifted windows
        kvs, decomposed = self.slots["attn"].prefixes(win.shape[0])
        # One set of learned keys/values for every window: (B, H, P, Dh) -> (B, nW, H, P, Dh).
        kvs = [tuple(t[:, None].expand(-1, win.shape[1], -1, -1, -1) for t in kv) for kv in kvs]
        drop = a.attn_drop.p if self.training else 0.0
        o = attend_biased(q, k, v, bias, prefixes=kvs, decomposed=decomposed, dropout_p=drop, scale=a.scale)
        return a.proj_drop(self.slots["attn.proj"].linear(rearrange(o, "b w h n d -> b w n (h d)"), a.proj))

    def _mlp_branch(self, x: Tensor, mask: Tensor | None) -> Tensor:  # (B, N, C)
        m = self.mlp
        h = m.drop1(m.act(self.slots["mlp.fc1"].linear(self.norm2(x), m.fc1)))
        return self.drop_path2(m.drop2(self.slots["mlp.fc2"].linear(m.norm(h), m.fc2)))


def _check(model: nn.Module) -> None:
    """Every part the re-written forward reproduces exactly, checked before anything changes."""
    if not isinstance(model, SwinTransformer):
        raise refuse(f"A {type(model).__name__}", "the swin backbone wraps timm SwinTransformer (v1) models; Swin-V2's "
                     "post-norm blocks, cosine attention and continuous position bias are not re-written")
    if model.dynamic_img_size:
        raise refuse("A SwinTransformer with dynamic_img_size / strict_img_size=False",
                     "its shifted-window masks are rebuilt for each input size; build it for one image size")
    if type(model.patch_embed) is not PatchEmbed:
        raise refuse(f"patch_embed {type(model.patch_embed).__name__}", "only timm's PatchEmbed is read")
    if type(model.head) is not ClassifierHead or not model.global_pool:
        raise refuse(f"head {type(model.head).__name__} with global_pool={model.global_pool!r}",
                     "the head site reads pooled (B, D) pre-logits of timm's ClassifierHead")
    for s, stage in enumerate(model.layers):
        where = f"layers.{s}"
        if type(stage) is not SwinTransformerStage:
            raise refuse(f"{where} is a {type(stage).__name__}", "only timm's SwinTransformerStage is re-written")
        if type(stage.downsample) not in (PatchMerging, nn.Identity):
            raise refuse(f"{where}.downsample is a {type(stage.downsample).__name__}", "only PatchMerging is re-written")
        for j, block in enumerate(stage.blocks):
            at = f"{where}.blocks.{j}"
            if type(block) is not SwinTransformerBlock:
                raise refuse(f"{at} is a {type(block).__name__}", "only timm's SwinTransformerBlock is re-written")
            extra = set(dict(block.named_children())) - _BLOCK_CHILDREN
            if extra:
                raise refuse(f"{at} has extra submodules {sorted(extra)}", "the re-written forward would skip them")
            if type(block.attn) is not WindowAttention:
                raise refuse(f"{at}.attn is a {type(block.attn).__name__}", "only timm's WindowAttention is re-written")
            if type(block.mlp) is not Mlp or not isinstance(block.mlp.fc1, nn.Linear):
                raise refuse(f"{at}.mlp is a {type(block.mlp).__name__}", "only timm's linear Mlp is re-written")


@register_backbone("swin")
class SwinBackbone(StagedBackbone):
    """timm ``SwinTransformer`` with sites embed, blocks.{i}[.attn|.mlp][.qkv|.proj|.fc1|.fc2],
    blocks.{i}.downsample.reduction, norm, head; ``stages.{s}`` selects a stage's blocks."""

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, SwinTransformer)

    @classmethod
    def create(cls, *, model: str = "swin_tiny_patch4_window7_224", pretrained: bool | str = False,
               num_classes: int | None = None, img_size: int | None = None, **timm_kwargs: Any) -> SwinBackbone:
        """``pretrained``: False, True (timm's hub weights) or a local file or folder of weights."""
        return cls(create_timm(model, "swin*", pretrained, num_classes, img_size, **timm_kwargs))

    def __init__(self, model: SwinTransformer) -> None:
        _check(model)  # all checks before anything is modified
        super().__init__(model)
        patch = tuple(model.patch_embed.patch_size)
        grid = tuple(model.patch_embed.grid_size)
        self.add_site(SiteSpec("embed", "embed", model.embed_dim, frozenset({"unfreeze"}),
                               refused={"prompt": PROMPT_REFUSED}, info={"patch_size": patch, "grid": grid}),
                      OpHandle("embed", {"patch_embed": model.patch_embed}))
        self.stages, i = [], 0
        for s, stage in enumerate(model.layers):
            first = i
            for j, block in enumerate(stage.blocks):
                info = {"stage": s, "grid": tuple(block.input_resolution), "window": tuple(block.window_size),
                        "shift": tuple(block.shift_size), "patch_size": patch}
                merge = stage.downsample if j == 0 and isinstance(stage.downsample, PatchMerging) else None
                stage.blocks[j] = SwinBlock(block, self._block_slots(i, block, info, merge))
                i += 1
            self.stages.append(range(first, i))
        self.add_site(SiteSpec("norm", "norm", model.num_features, frozenset({"unfreeze"})),
                      OpHandle("norm", {"norm": model.norm}))
        fc = model.head.fc
        self.add_site(SiteSpec("head", "head", model.num_features, frozenset({"replace", "unfreeze"}),
                               out_dim=fc.out_features if isinstance(fc, nn.Linear) else model.num_features),
                      OpHandle("head", {"head": fc}))

    def _block_slots(self, i: int, block: SwinTransformerBlock, info: dict, merge: PatchMerging | None) -> dict[str, Slot]:
        a, dim, p = block.attn, block.dim, f"blocks.{i}"
        head_dim = a.qkv.out_features // (3 * a.num_heads)
        common = {"layer": i, "num_heads": a.num_heads, "head_dim": head_dim, "info": info,
                  "features": frozenset({"query", "key_value", "spatial"}), "refused": {"prompt": PROMPT_REFUSED}}
        mods_attn = {"norm1": block.norm1, "attn": block.attn}
        mods_mlp = {"norm2": block.norm2, "mlp": block.mlp}
        mods_block = {**mods_attn, **mods_mlp, **({"downsample": merge} if merge is not None else {})}
        slots = {
            "block": self.add_site(SiteSpec(p, "block", dim, _OP_PLACEMENTS, **common),
                                   SwinOpHandle(p, mods_block, block.norm1, a)),
            "attn": self.add_site(SiteSpec(f"{p}.attn", "attn", dim, _OP_PLACEMENTS | {"prefix"},
                                           **{**common, "features": common["features"] | {"raw_key_value", "out_proj"}}),
                                  SwinOpHandle(f"{p}.attn", mods_attn, block.norm1, a)),
            "mlp": self.add_site(SiteSpec(f"{p}.mlp", "mlp", dim, _OP_PLACEMENTS, **common),
                                 SwinOpHandle(f"{p}.mlp", mods_mlp, block.norm2, a)),
        }
        layers = [("attn.qkv", a.qkv), ("attn.proj", a.proj), ("mlp.fc1", block.mlp.fc1), ("mlp.fc2", block.mlp.fc2)]
        if merge is not None:
            layers.append(("downsample.reduction", merge.reduction))
        for name, layer in layers:
            slots[name] = self.add_linear_site(f"{p}.{name}", layer, index=i, split=3 if name == "attn.qkv" else 1,
                                               stage=info["stage"])
        return slots

    # Running ----------------------------------------------------------------------------
    def _merge(self, s: int, x: Tensor) -> Tensor:
        """The patch merging that opens stage ``s``: (B, H, W, C) -> (B, H/2, W/2, C')."""
        d = self.model.layers[s].downsample
        if not isinstance(d, PatchMerging):
            return x
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = rearrange(x, "b (h i) (w j) c -> b h w (j i c)", i=2, j=2)  # timm's 2x2 neighbour order
        return self.slot(f"blocks.{self.stages[s].start}.downsample.reduction").linear(d.norm(x), d.reduction)

    def forward(self, pixel_values: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, classes)
        return self.head(self.intermediates(pixel_values, layers=[]).pooled)

    def head(self, pooled: Tensor) -> Tensor:  # (B, D) -> (B, classes)
        return self.slot("head").apply(pooled, lambda t, _: self.model.head.fc(t))

    def feature_options(self) -> dict[str, Any]:
        return {"global_pool": self.model.global_pool}

    def intermediates(self, pixel_values: Tensor, *, layers: list[int]) -> Features:
        """Block outputs as tokens (B, H_s*W_s, C_s) on the path ``forward`` takes; the last block
        of stage ``s`` is timm's ``forward_intermediates`` output ``s``. ``final``: after the final
        norm, (B, N, D); ``pooled``: the head's pre-logits (B, D)."""
        m, wanted, inter = self.model, set(layers), {}
        x = self.slot("embed").apply(m.patch_embed(pixel_values), lambda t, _: t)  # (B, H, W, C)
        for s, stage in enumerate(m.layers):
            x = self._merge(s, x)
            recompute = stage.grad_checkpointing and torch.is_grad_enabled()
            for i, block in zip(self.stages[s], stage.blocks):
                x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
                if i in wanted:
                    inter[i] = x.flatten(1, 2)  # (B, H*W, C)
        final = self.slot("norm").apply(x, lambda t, _: m.norm(t))  # (B, H, W, D)
        return Features(inter, final.flatten(1, 2), m.forward_head(final, pre_logits=True), None, {"prefix_tokens": 0})

    def example_inputs(self, batch_size: int = 2) -> dict[str, Tensor]:
        return {"pixel_values": torch.randn(batch_size, self.model.in_chans, *self.model.patch_embed.img_size)}


def create_timm(model: str, family: str, pretrained: bool | str, num_classes: int | None, img_size: int | None,
                **timm_kwargs: Any) -> nn.Module:
    """A timm model by name (``pretrained``: False, True or a local file/folder of weights)."""
    import timm

    from utuning.backbones.vit import _weights_file

    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    if isinstance(pretrained, str):
        kwargs["pretrained_cfg_overlay"] = {"file": _weights_file(pretrained)}
        pretrained = True
    if model.split(".")[0] not in timm.list_models():
        raise UnknownNameError(f"Unknown timm model {model!r}. Did you mean {closest(model, timm.list_models(family))}?")
    return timm.create_model(model, pretrained=bool(pretrained), **kwargs)
