"""timm ConvNeXt (Liu et al. 2022, arXiv 2201.03545): a convolutional network under the same
sites, to show the frozen-operation-plus-tuner form is not tied to attention.

Sites (blocks numbered globally across the four stages; ``stages.{s}`` selects a stage's blocks,
as for Swin)::

    embed                  the stem (patchify conv + norm), ``unfreeze``
    embed.stem.{k}         the stem's convolutions (conv sites: ``conv_lora``)
    blocks.{i}             OP = drop_path(gamma * mlp(norm(conv_dw(x)))): the residual branch of
                           block i; the shortcut is added after the slot, so a parallel tuner beside
                           the branch is one beside the whole block, and a sequential one reads the
                           branch output before the residual sum
    blocks.{i}.conv_dw     the depthwise 7x7 convolution (conv site; ``conv_lora`` refuses groups > 1)
    blocks.{i}.downsample.conv   the stride-2 convolution that opens stage s > 0 (i: its first block)
    blocks.{i}.mlp.fc1     the block's pointwise layers (nn.Linear, or 1x1 convolutions with
    blocks.{i}.mlp.fc2     ``conv_mlp``, seen as the linear layers they are, so LoRA / SSF / BitFit /
                           IA3 merge into the convolution's own weights)
    norm                   norm_pre and the head's norm (train-only: ``unfreeze``)
    head                   the classifier on the pooled pre-logits (B, D)

Tuners see feature maps channels-last, (B, H, W, C): every token-wise tuner (adapters, p_adapter,
LoRA...) works unchanged on the channel axis, and a convolutional tuner (``convpass``) convolves
the map. Refused with the reason: ``prompt`` (no token sequence to insert into), ``prefix`` and the
tuners needing a frozen query or key/value projection (no attention). Side tuners read block
outputs as (B, H*W, C) tokens; the last block of stage ``s`` is timm's ``forward_intermediates``
output ``s``. Full fine-tuning of a stage's first block also trains the downsampling that opens
the stage. ConvNeXt-V2 (GRN in the MLP) is refused by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, Mlp, NormMlpClassifierHead
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from utuning.backbone import Features, refuse
from utuning.backbones.swin import StagedBackbone, create_timm
from utuning.errors import PlacementError
from utuning.handle import LinearHandle, OpHandle
from utuning.registry import register_backbone
from utuning.sites import SiteSpec
from utuning.slot import Slot

_BLOCK_CHILDREN = {"conv_dw", "norm", "mlp", "shortcut", "drop_path"}
NO_TOKENS = "a convolutional block has no token sequence to insert prompt tokens into"
NO_ATTENTION = "ConvNeXt has no attention: no keys and values to join prefixes to"
REFUSED = {"prompt": NO_TOKENS, "prefix": NO_ATTENTION,
           "query": "ConvNeXt has no attention, so no frozen query projection",
           "key_value": "ConvNeXt has no attention, so no frozen key/value projections"}


class Pointwise:
    """A frozen 1x1 convolution seen as the linear layer it is: ``weight`` (C_out, C_in) is a view
    of the convolution's (C_out, C_in, 1, 1) weight, so in-place merges land in the convolution."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv

    @property
    def weight(self) -> Tensor:
        return self.conv.weight.flatten(1)  # a view: (C_out, C_in)

    @weight.setter
    def weight(self, value: Tensor) -> None:  # ``op.linear.weight += delta`` re-assigns the updated view
        if value.data_ptr() != self.conv.weight.data_ptr():
            raise PlacementError("Assign a 1x1 convolution's weight in place (its linear view shares its storage)")

    @property
    def bias(self) -> nn.Parameter | None:
        return self.conv.bias

    @bias.setter
    def bias(self, value: Tensor) -> None:  # ``op.linear.bias += delta`` re-assigns the updated bias
        if self.conv.bias is None or value.data_ptr() != self.conv.bias.data_ptr():
            raise PlacementError("Update a 1x1 convolution's bias in place; it has none to replace")

    @property
    def in_features(self) -> int:
        return self.conv.in_channels

    @property
    def out_features(self) -> int:
        return self.conv.out_channels

    def __call__(self, x: Tensor) -> Tensor:  # (..., C_in) -> (..., C_out)
        return F.linear(x, self.weight, self.bias)


class PointwiseHandle(OpHandle):
    """Handle of a 1x1-convolution site: the convolution's own parameters, and its linear view."""

    def __init__(self, site: str, conv: nn.Conv2d) -> None:
        super().__init__(site, {"": conv})
        self._conv, self._linear = conv, Pointwise(conv)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self._conv.named_parameters()

    @property
    def linear(self) -> Pointwise:  # type: ignore[override]
        return self._linear


class ConvBlock(nn.Module):
    """A timm ``ConvNeXtBlock`` with operation slots, on channels-last maps (B, H, W, C); the
    frozen submodules keep their names (``gamma`` included)."""

    def __init__(self, block: ConvNeXtBlock, slots: dict[str, Slot]) -> None:
        super().__init__()
        for name in ("conv_dw", "norm", "mlp", "shortcut", "drop_path", "gamma"):
            setattr(self, name, getattr(block, name))
        self.use_conv_mlp = block.use_conv_mlp
        # 1x1 convolutions run as the linear layers they are, on channels-last maps (not registered:
        # the views hold the same frozen convolutions).
        self._pointwise = (Pointwise(block.mlp.fc1), Pointwise(block.mlp.fc2)) if block.use_conv_mlp else None
        self.slots = slots  # plain dict: the slots are registered once, in the backbone adapter

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C_in) -> (B, H, W, C)
        y = self.slots["block"].apply(x, self._branch)
        if isinstance(self.shortcut, nn.Identity):
            return x + y
        return self.shortcut(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + y

    def _branch(self, x: Tensor, mask: Tensor | None) -> Tensor:  # (B, H, W, C_in) -> (B, H, W, C)
        h = self.slots["conv_dw"].linear(x.permute(0, 3, 1, 2), self.conv_dw)  # (B, C, H, W)
        # The norm as timm applies it: on NCHW before a conv MLP, channels-last before a linear one.
        h = self.norm(h).permute(0, 2, 3, 1) if self.use_conv_mlp else self.norm(h.permute(0, 2, 3, 1))
        m = self.mlp
        fc1, fc2 = self._pointwise or (m.fc1, m.fc2)
        h = m.drop1(m.act(self.slots["mlp.fc1"].linear(h, fc1)))  # (B, H, W, hidden)
        h = m.drop2(self.slots["mlp.fc2"].linear(m.norm(h), fc2))  # (B, H, W, C)
        return self.drop_path(h if self.gamma is None else h * self.gamma)


def _check(model: nn.Module) -> None:
    """Every part the re-written forward reproduces exactly, checked before anything changes."""
    if not isinstance(model, ConvNeXt):
        raise refuse(f"A {type(model).__name__}", "the convnext backbone wraps timm ConvNeXt models")
    head = model.head
    if type(head) not in (NormMlpClassifierHead, ClassifierHead) or head.global_pool.is_identity():
        raise refuse(f"head {type(head).__name__} without pooling", "the head site reads pooled (B, D) pre-logits")
    if not isinstance(model.stem, nn.Sequential):
        raise refuse(f"stem {type(model.stem).__name__}", "the stem is run layer by layer (an nn.Sequential)")
    for s, stage in enumerate(model.stages):
        if type(stage) is not ConvNeXtStage:
            raise refuse(f"stages.{s} is a {type(stage).__name__}", "only timm's ConvNeXtStage is re-written")
        down = stage.downsample
        if not isinstance(down, nn.Identity) and not (isinstance(down, nn.Sequential) and len(down) == 2
                                                      and isinstance(down[1], nn.Conv2d)):
            raise refuse(f"stages.{s}.downsample {down!r}", "only timm's (norm, conv) downsampling is re-written")
        for j, block in enumerate(stage.blocks):
            at = f"stages.{s}.blocks.{j}"
            if type(block) is not ConvNeXtBlock:
                raise refuse(f"{at} is a {type(block).__name__}", "only timm's ConvNeXtBlock is re-written")
            extra = set(dict(block.named_children())) - _BLOCK_CHILDREN
            if extra:
                raise refuse(f"{at} has extra submodules {sorted(extra)}", "the re-written forward would skip them")
            if type(block.mlp) is not Mlp:
                raise refuse(f"{at}.mlp is a {type(block.mlp).__name__} (ConvNeXt-V2's global response norm)",
                             "only timm's Mlp is re-written")
            m = block.mlp
            kind = nn.Conv2d if block.use_conv_mlp else nn.Linear
            if not all(type(fc) is kind for fc in (m.fc1, m.fc2)) or (block.use_conv_mlp and not isinstance(m.norm, nn.Identity)):
                raise refuse(f"{at}.mlp with {type(m.fc1).__name__}/{type(m.norm).__name__} layers",
                             f"only a plain {kind.__name__} MLP is re-written")


@register_backbone("convnext")
class ConvNeXtBackbone(StagedBackbone):
    """timm ``ConvNeXt`` with sites embed, blocks.{i}, blocks.{i}.mlp.fc1/fc2, norm, head."""

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, ConvNeXt)

    @classmethod
    def create(cls, *, model: str = "convnext_atto", pretrained: bool | str = False, num_classes: int | None = None,
               img_size: int | None = None, **timm_kwargs: Any) -> ConvNeXtBackbone:
        """``pretrained``: False, True (timm's hub weights) or a local file or folder of weights.
        ``img_size`` is accepted and ignored: a ConvNeXt takes any image size."""
        return cls(create_timm(model, "convnext*", pretrained, num_classes, None, **timm_kwargs))

    def __init__(self, model: ConvNeXt) -> None:
        _check(model)  # all checks before anything is modified
        super().__init__(model)
        stem_dim = model.stages[0].blocks[0].conv_dw.in_channels
        self.add_site(SiteSpec("embed", "embed", stem_dim, frozenset({"unfreeze"}), refused=REFUSED),
                      OpHandle("embed", {"stem": model.stem}))
        for k, layer in enumerate(model.stem):
            if isinstance(layer, nn.Conv2d):
                self._conv_site(f"embed.stem.{k}", layer, None, None)
        self.stages, i = [], 0
        for s, stage in enumerate(model.stages):
            first = i
            for j, block in enumerate(stage.blocks):
                down = stage.downsample if j == 0 and not isinstance(stage.downsample, nn.Identity) else None
                stage.blocks[j] = ConvBlock(block, self._block_slots(i, s, block, down))
                i += 1
            self.stages.append(range(first, i))
        head = model.head
        norms = {"norm_pre": model.norm_pre, "head_norm": getattr(head, "norm", None),
                 "pre_logits": getattr(head, "pre_logits", None)}
        self.add_site(SiteSpec("norm", "norm", model.num_features, frozenset({"unfreeze"})),
                      OpHandle("norm", {k: v for k, v in norms.items() if v is not None}))
        fc, dim = head.fc, head.num_features
        self.add_site(SiteSpec("head", "head", dim, frozenset({"replace", "unfreeze"}),
                               out_dim=fc.out_features if isinstance(fc, nn.Linear) else dim),
                      OpHandle("head", {"head": fc}))

    def _block_slots(self, i: int, s: int, block: ConvNeXtBlock, down: nn.Module | None) -> dict[str, Slot]:
        p, m = f"blocks.{i}", block.mlp
        mods = {"conv_dw": block.conv_dw, "norm": block.norm, "mlp": m, "gamma": block.gamma,
                "shortcut": block.shortcut, "downsample": down}
        spec = SiteSpec(p, "block", block.conv_dw.in_channels, frozenset({"parallel", "sequential", "unfreeze"}),
                        out_dim=block.conv_dw.out_channels, layer=i, refused=REFUSED, info={"stage": s},
                        features=frozenset({"spatial"}))
        slots = {"block": self.add_site(spec, OpHandle(p, {k: v for k, v in mods.items() if v is not None})),
                 "conv_dw": self._conv_site(f"{p}.conv_dw", block.conv_dw, i, s)}
        if down is not None:
            self._conv_site(f"{p}.downsample.conv", down[1], i, s)
        for name, fc in (("mlp.fc1", m.fc1), ("mlp.fc2", m.fc2)):
            conv = isinstance(fc, nn.Conv2d)
            d_in, d_out = (fc.in_channels, fc.out_channels) if conv else (fc.in_features, fc.out_features)
            spec = SiteSpec(f"{p}.{name}", "linear", d_in, frozenset({"reparam", "unfreeze"}), out_dim=d_out, layer=i,
                            info={"split": 1, "stage": s, "conv1x1": conv})
            slots[name] = self.add_site(spec, PointwiseHandle(spec.name, fc) if conv else LinearHandle(spec.name, fc))
        return slots

    def _conv_site(self, name: str, conv: nn.Conv2d, i: int | None, s: int | None) -> Slot:
        """A frozen convolution (stem, depthwise, downsampling): ``unfreeze``, and ``reparam``
        (conv_lora) where it is a plain ``nn.Conv2d`` with numeric padding."""
        info = {k: getattr(conv, k) for k in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")}
        plain = type(conv) is nn.Conv2d and not isinstance(conv.padding, str)
        placements = frozenset({"reparam", "unfreeze"} if plain else {"unfreeze"})
        why = {"reparam": f"a {type(conv).__name__} pads at run time; reparameterisation needs a plain Conv2d"}
        spec = SiteSpec(name, "conv", conv.in_channels, placements, out_dim=conv.out_channels, layer=i,
                        refused={**REFUSED, **({} if plain else why)}, info={**info, "stage": s})
        return self.add_site(spec, OpHandle(name, {"": conv}))

    # Running ----------------------------------------------------------------------------
    def forward(self, pixel_values: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, classes)
        return self.head(self.intermediates(pixel_values, layers=[]).pooled)

    def head(self, pooled: Tensor) -> Tensor:  # (B, D) -> (B, classes)
        return self.slot("head").apply(pooled, lambda t, _: self.model.head.fc(t))

    def feature_options(self) -> dict[str, Any]:
        return {"global_pool": self.model.head.global_pool.pool_type}

    def intermediates(self, pixel_values: Tensor, *, layers: list[int]) -> Features:
        """Block outputs as tokens (B, H*W, C) on the path ``forward`` takes; ``final``: after
        ``norm_pre``, (B, N, D); ``pooled``: the head's pre-logits (B, D)."""
        m, wanted, inter = self.model, set(layers), {}
        x = pixel_values
        for k, layer in enumerate(m.stem):
            x = self.slot(f"embed.stem.{k}").linear(x, layer) if isinstance(layer, nn.Conv2d) else layer(x)
        x = self.slot("embed").apply(x, lambda t, _: t).permute(0, 2, 3, 1)  # (B, H, W, C)
        for s, stage in enumerate(m.stages):
            if not isinstance(stage.downsample, nn.Identity):
                norm, conv = stage.downsample
                h = self.slot(f"blocks.{self.stages[s].start}.downsample.conv").linear(norm(x.permute(0, 3, 1, 2)), conv)
                x = h.permute(0, 2, 3, 1)  # (B, H/2, W/2, C')
            recompute = stage.grad_checkpointing and torch.is_grad_enabled()
            for i, block in zip(self.stages[s], stage.blocks):
                x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
                if i in wanted:
                    inter[i] = x.flatten(1, 2)  # (B, H*W, C)
        final = self.slot("norm").apply(x.permute(0, 3, 1, 2), lambda t, _: m.norm_pre(t))  # (B, C, H, W)
        pooled = m.forward_head(final, pre_logits=True)  # (B, D)
        return Features(inter, final.flatten(2).transpose(1, 2), pooled, None, {"prefix_tokens": 0})

    def example_inputs(self, batch_size: int = 2) -> dict[str, Tensor]:
        return {"pixel_values": torch.randn(batch_size, self.model.in_chans, 32, 32)}
