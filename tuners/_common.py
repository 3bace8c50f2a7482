"""Pieces shared by several tuners: bottleneck MLPs, scales, activations, prompt init."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from utuning.errors import ConfigError, closest

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}
SCALES = ("none", "scalar", "channel", "gate")


def choice(arg: str, value: str, choices) -> str:
    if value not in choices:
        raise ConfigError(f"Argument {arg}={value!r} is not one of {list(choices)}; did you mean {closest(str(value), choices)}?")
    return value


def positive(arg: str, value, minimum: float = 1) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"Argument {arg}={value!r} must be a number >= {minimum}")


class Bottleneck(nn.Module):
    """``up(dropout(act(down(x))))`` with ``up`` at zero, so the tuner starts as the identity."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, act: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        positive("hidden", hidden)
        self.down = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[choice("act", act, ACTIVATIONS)]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, out_dim or dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D_out)
        return self.up(self.dropout(self.act(self.down(x))))


class Scale(nn.Module):
    """How a parallel tuner's output is weighed (U-Tuning Sec. 3.3):

    none: 1; scalar: one learned number; channel: one per channel (the paper's default);
    gate: ``sigmoid(w·x + b)`` per token, computed from the operation's input.
    """

    def __init__(self, kind: str, dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.kind = choice("scale", kind, SCALES)
        if kind == "scalar":
            self.weight = nn.Parameter(torch.tensor(float(init)))
        elif kind == "channel":
            self.weight = nn.Parameter(torch.full((dim,), float(init)))
        elif kind == "gate":
            self.gate = nn.Linear(dim, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, math.log(init / (1 - init)) if 0 < init < 1 else 0.0)

    def forward(self, u: Tensor, x: Tensor) -> Tensor:
        if self.kind == "none":
            return u
        if self.kind == "gate":
            return u * torch.sigmoid(self.gate(x))  # (B, N, 1)
        return u * self.weight

    def extra_repr(self) -> str:
        return self.kind


def init_prompts(prompts: Tensor, site_info, init: str) -> None:
    """VPT's initialisation (uniform, Xavier-style over a patch) or a normal(0, 0.02)."""
    choice("init", init, ("vpt", "normal", "zeros"))
    if init == "zeros":
        nn.init.zeros_(prompts)
    elif init == "vpt" and "patch_size" in site_info:
        ph, pw = site_info["patch_size"]
        val = math.sqrt(6.0 / float(3 * ph * pw + prompts.shape[-1]))
        nn.init.uniform_(prompts, -val, val)
    else:
        nn.init.normal_(prompts, std=0.02)


class AdditiveMerge:
    """Mixin for reparam tuners whose merge adds ``delta_weight()`` (out, in) to the frozen weight
    (LoRA, LoHa, LoKr, VeRA, FacT). A safe merge, as PEFT's ``safe_merge``: the delta is computed in
    float32 and checked for non-finite values before the frozen weight is touched."""

    def _delta(self, op) -> Tensor:
        wide = torch.promote_types(op.linear.weight.dtype, torch.float32)  # float32 at least (float64 stays)
        delta = self.delta_weight().to(wide)
        if not torch.isfinite(delta).all():
            raise ConfigError(f"{self.name} at {op.site!r}: the weight update holds NaN or infinity; refusing to "
                              "merge it into the frozen weights")
        return delta

    @torch.no_grad()
    def merge(self, op) -> None:
        weight, delta = op.linear.weight, self._delta(op)
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self, op) -> None:
        weight, delta = op.linear.weight, self._delta(op)
        weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))


@torch.no_grad()
def start_from_frozen_head(head: nn.Linear, backbone) -> None:
    """A side tuner's classifier starts as a copy of the backbone's frozen head when the shapes agree
    (so, e.g., a zero-initialised side path leaves the model's predictions unchanged)."""
    frozen = backbone.slot("head").handle.modules.get("head") if "head" in backbone.site_names() else None
    if isinstance(frozen, nn.Linear) and frozen.weight.shape == head.weight.shape:
        head.weight.copy_(frozen.weight)
        if frozen.bias is not None and head.bias is not None:
            head.bias.copy_(frozen.bias)

