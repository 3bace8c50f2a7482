"""LoRA beyond linear layers: a low-rank update beside a frozen ``nn.Conv1d/2d/3d`` or ``nn.Embedding``
(sites of the generic adapter), mergeable into it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.errors import ConfigError, PlacementError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import positive

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _wide(delta: Tensor) -> Tensor:
    """The update in at least float32 (half-precision updates lose what merge adds)."""
    return delta.to(torch.promote_types(delta.dtype, torch.float32))


@register_tuner("conv_lora")
class ConvLoRA(Tuner):
    """LoRA (Hu et al. 2021, arXiv 2106.09685) on a convolution, as HF PEFT writes it:
    ``y = W * x + s·B * (A * x)``, ``s = alpha/rank``.

    ``A`` is a convolution with the frozen one's kernel, stride, padding and dilation down to
    ``rank`` channels (Kaiming-uniform), ``B`` a 1x1 convolution back up (zeros: the tuner starts
    as the identity). Their composition is one convolution with the frozen one's geometry and
    weight ``ΔW[o, i] = s·Σ_r B[o, r] A[r, i]``, which ``merge`` adds to the frozen weight.
    Grouped convolutions and padding modes other than ``zeros`` are refused (the update would
    not be a convolution of the same shape). Conv sites' handles map ``""`` to the convolution.
    """

    placement = "reparam"
    site_kinds = frozenset({"conv"})
    paper = "https://arxiv.org/abs/2106.09685"

    def __init__(self, site: SiteSpec, *, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0) -> None:
        super().__init__(site)
        positive("rank", rank)
        info = site.info
        if info.get("groups", 1) != 1:
            raise ConfigError(f"conv_lora at {site.name!r}: the convolution has groups={info['groups']}; "
                              "conv_lora adapts ungrouped convolutions (groups=1)")
        if info.get("padding_mode", "zeros") != "zeros":
            raise ConfigError(f"conv_lora at {site.name!r}: padding_mode={info['padding_mode']!r}; "
                              "conv_lora adapts convolutions with padding_mode='zeros'")
        kernel = tuple(info["kernel_size"])
        self.stride, self.padding, self.dilation = info["stride"], info["padding"], info["dilation"]
        self.conv = _CONV[len(kernel)]
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, site.dim, *kernel))  # (r, C_in, *k)
        self.lora_B = nn.Parameter(torch.zeros(site.out_dim, rank, *(1,) * len(kernel)))  # (C_out, r, 1...)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> Tensor:
        """The update of the frozen weight, (C_out, C_in, *k)."""
        return torch.einsum("or,ri...->oi...", self.lora_B.flatten(1), self.lora_A) * self.scaling

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (B, C_in, *S), y (B, C_out, *S')
        h = self.conv(self.dropout(x), self.lora_A, None, self.stride, self.padding, self.dilation)  # (B, r, *S')
        return y + self.conv(h, self.lora_B) * self.scaling

    def _weight(self, op: OpHandle) -> Tensor:
        layer = op.modules.get("")
        if not isinstance(layer, nn.modules.conv._ConvNd):
            raise PlacementError(f"conv_lora cannot merge into {op.site!r}: its handle holds no convolution")
        return layer.weight

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        weight = self._weight(op)
        delta = _wide(self.delta_weight())  # in at least float32, checked before it touches frozen weights
        if not torch.isfinite(delta).all():
            raise PlacementError(f"conv_lora at {op.site!r}: the update holds non-finite values; not merged")
        weight += delta.to(weight.dtype)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        weight = self._weight(op)
        weight -= _wide(self.delta_weight()).to(weight.dtype)


@register_tuner("embedding_lora")
class EmbeddingLoRA(Tuner):
    """LoRA (Hu et al. 2021, arXiv 2106.09685) on an embedding table, as HF PEFT writes it:
    ``y = E[ids] + s·B Aᵀ[ids]`` with ``A`` (rank, V) at zero (the identity at init) and ``B``
    (D, rank) normal; ``merge`` adds ``s·(B A)ᵀ`` to the frozen table. Embeddings with
    ``max_norm`` (which rewrite their rows when looked up) are refused."""

    placement = "reparam"
    site_kinds = frozenset({"embed"})
    paper = "https://arxiv.org/abs/2106.09685"

    def __init__(self, site: SiteSpec, *, rank: int = 8, alpha: float = 8.0) -> None:
        super().__init__(site)
        positive("rank", rank)
        if "num_embeddings" not in site.info or site.info.get("max_norm") is not None:
            raise ConfigError(f"embedding_lora at {site.name!r}: needs an nn.Embedding site without max_norm")
        self.padding_idx = site.info.get("padding_idx")
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.zeros(rank, site.info["num_embeddings"]))  # (r, V)
        self.lora_B = nn.Parameter(torch.randn(site.dim, rank))  # (D, r)

    def delta_weight(self) -> Tensor:
        """The update of the frozen table, (V, D)."""
        return (self.lora_B @ self.lora_A).T * self.scaling

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (...) ids, y (..., D)
        h = F.embedding(x, self.lora_A.T, padding_idx=self.padding_idx)  # (..., r)
        return y + (h @ self.lora_B.T) * self.scaling

    def _weight(self, op: OpHandle) -> Tensor:
        layer = op.modules.get("")
        if not isinstance(layer, nn.Embedding):
            raise PlacementError(f"embedding_lora cannot merge into {op.site!r}: its handle holds no nn.Embedding")
        return layer.weight

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        weight, delta = self._weight(op), _wide(self.delta_weight())
        if not torch.isfinite(delta).all():
            raise PlacementError(f"embedding_lora at {op.site!r}: the update holds non-finite values; not merged")
        weight += delta.to(weight.dtype)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        weight = self._weight(op)
        weight -= _wide(self.delta_weight()).to(weight.dtype)
