"""Convpass: a convolutional bypass beside a frozen operation (Jie & Deng 2022, arXiv 2208.07463)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.errors import ConfigError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import ACTIVATIONS, choice, positive


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation Convpass uses (CLIP's GELU approximation)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)

NO_GRID = ("convpass convolves over the 2-D image grid of the tokens, and this site's tokens have no spatial layout "
           "(text or another sequence); use a token-wise tuner here (adapter, lora)")


@register_tuner("convpass")
class Convpass(Tuner):
    """Convpass (arXiv 2208.07463): ``U(x) = s · up(drop(act(conv_kxk(act(down(x))))))`` beside an
    attention, FFN or block operation, with the convolution over the spatial layout of the tokens:
    the hard-coded inductive bias ViTs lack.

    Sites need the feature ``spatial`` (their tokens lie on a 2-D grid: the vision adapters
    declare it); text and other sequences are refused at attach. Feature maps (B, H, W, C)
    (ConvNeXt) are convolved as they are. Tokens (B, N, C) are laid out
    on their grid: ``SiteSpec.info["grid"]`` where the backbone gives it (Swin), else a square
    grid; class/register tokens (``prefix_tokens``) are convolved as 1x1 maps, so only the
    kernel's centre tap acts on them, as in the paper. The convolution starts as the identity on
    channels (centre tap ``I``, the paper's init) and ``up`` at zero, so attaching it leaves the
    outputs unchanged. The paper's adapter reads ``norm1(x)``; here it reads the operation's input
    (the parallel placement), and ``layernorm=True`` adds a LayerNorm of its own. ``scale`` is the
    paper's ``s`` (tuned per task there, 0.01 to 100).
    """

    placement = "parallel"
    site_kinds = frozenset({"attn", "mlp", "block"})
    requires = frozenset({"spatial"})  # the site's tokens lie on a 2-D grid (vision adapters declare it)
    paper = "https://arxiv.org/abs/2208.07463"

    @classmethod
    def check_site(cls, site: SiteSpec) -> None:
        """Refuse, before anything is built, sites whose tokens have no 2-D layout (text, sequences)."""
        if "spatial" not in site.features and "spatial" not in site.refused:
            site = dataclasses.replace(site, refused={**site.refused, "spatial": NO_GRID})
        super().check_site(site)

    def __init__(self, site: SiteSpec, *, hidden: int = 8, kernel_size: int = 3, scale: float = 1.0,
                 act: str = "quick_gelu", dropout: float = 0.1, layernorm: bool = False) -> None:
        super().__init__(site)
        positive("hidden", hidden)
        positive("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ConfigError(f"Argument kernel_size={kernel_size} must be odd, so the output keeps the grid")
        choice("act", act, ("quick_gelu", *ACTIVATIONS))
        self.norm = nn.LayerNorm(site.dim) if layernorm else nn.Identity()
        self.down = nn.Linear(site.dim, hidden)  # a 1x1 convolution
        self.conv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2)
        self.up = nn.Linear(hidden, site.out_dim)
        self.act = QuickGELU() if act == "quick_gelu" else ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout)
        self.scale = float(scale)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, kernel_size // 2, kernel_size // 2] = torch.eye(hidden)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _conv_map(self, h: Tensor) -> Tensor:  # (B, H, W, d) -> (B, H, W, d)
        return self.conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def _grid(self, n: int) -> tuple[int, int]:
        grid = self.site.info.get("grid")
        if grid is not None and grid[0] * grid[1] == n:
            return tuple(grid)
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"convpass at {self.site.name!r} cannot lay {n} tokens (after {self.site.prefix_tokens} "
                              "class/register tokens) on a grid: the backbone gives no grid and it is not square "
                              "(prompt tokens at the same site change the count)")
        return side, side

    def forward(self, x: Tensor, op: OpHandle) -> Tensor:  # (B, N, C) or (B, H, W, C) -> same, C_out
        h = self.act(self.down(self.norm(x)))  # (..., d)
        if h.dim() == 4:
            h = self._conv_map(h)
        else:
            p = self.site.prefix_tokens
            rows, cols = self._grid(h.shape[1] - p)
            grid = self._conv_map(h[:, p:].unflatten(1, (rows, cols))).flatten(1, 2)  # (B, H*W, d)
            k = self.conv.kernel_size[0] // 2
            prefix = F.linear(h[:, :p], self.conv.weight[:, :, k, k], self.conv.bias)  # a 1x1 map: centre tap only
            h = torch.cat([prefix, grid], dim=1)
        return self.scale * self.up(self.dropout(self.act(h)))
