"""Tuners that shift or scale a frozen linear layer: BitFit, SSF and IA3. All merge.

Memory: ``z = γ ⊙ y + β`` written as plain autograd keeps the unscaled output ``y`` alive for
γ's gradient, a second activation beside ``z`` (which the next operation, e.g. GELU or
attention, usually keeps too); that is why SSF and IA3 trained with more memory than full
fine-tuning. ``scale_shift`` keeps ``z`` instead and reads ``y = (z − β) / γ`` back in backward,
so a scaled layer costs nothing beyond what its consumer keeps anyway (and at most one tensor of
the layer's output size, as a LoRA layer keeps one of its input size). The reconstruction is
exact up to rounding for γ away from zero (γ starts at one; a channel with γ exactly zero has no
recoverable ``y``, and its γ gradient is NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from utuning.errors import ConfigError, PlacementError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner


class _ScaleShift(torch.autograd.Function):
    """``z = y ⊙ scale (+ shift)`` over the last dimension, keeping only ``z`` (and the vectors)."""

    @staticmethod
    def forward(ctx, y: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:  # y (..., D), scale/shift (D)
        z = y * scale if shift is None else torch.addcmul(shift, y, scale)
        ctx.has_shift = shift is not None
        ctx.y_dtype = y.dtype
        ctx.save_for_backward(z if ctx.needs_input_grad[1] else None, scale, shift)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # g (..., D)
        z, scale, shift = ctx.saved_tensors
        grad_y = (g * scale).to(ctx.y_dtype) if ctx.needs_input_grad[0] else None
        grad_scale = grad_shift = None
        if ctx.needs_input_grad[1]:
            y = z if shift is None else z - shift
            grad_scale = (g * (y / scale)).reshape(-1, g.shape[-1]).sum(0).to(scale.dtype)
        if ctx.has_shift and ctx.needs_input_grad[2]:
            grad_shift = g.reshape(-1, g.shape[-1]).sum(0).to(shift.dtype)
        return grad_y, grad_scale, grad_shift


def scale_shift(y: Tensor, scale: Tensor, shift: Tensor | None = None) -> Tensor:
    """``y ⊙ scale + shift`` (B, N, D) with the memory of one output tensor (see the module doc)."""
    return _ScaleShift.apply(y, scale, shift)


def _bias(op: OpHandle, who: str) -> nn.Parameter:
    if op.linear.bias is None:
        raise PlacementError(f"{who} cannot merge into {op.site!r}: the frozen layer has no bias")
    return op.linear.bias


@register_tuner("bitfit")
class BitFit(Tuner):
    """BitFit (Ben Zaken et al. 2021, arXiv 2106.10199): train only the biases.

    Written as a learned bias update ``y = W x + b + δ`` (δ starts at zero), which is the same
    training problem and leaves the frozen bias untouched until ``merge`` adds δ to it.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2106.10199"

    def __init__(self, site: SiteSpec) -> None:
        super().__init__(site)
        self.bias = nn.Parameter(torch.zeros(site.out_dim))

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:
        return y + self.bias

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        _bias(op, "bitfit").add_(self.bias)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        _bias(op, "bitfit").sub_(self.bias)


@register_tuner("ssf")
class SSF(Tuner):
    """Scaling and shifting features (Lian et al. 2022, arXiv 2210.08823): ``y = γ ⊙ (W x + b) + β``.

    γ and β start near 1 and 0 (normal with ``init_std``, the paper's 0.02; 0 gives the exact
    identity). Mergeable: ``W' = γ W``, ``b' = γ b + β``.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2210.08823"

    def __init__(self, site: SiteSpec, *, init_std: float = 0.02) -> None:
        super().__init__(site)
        self.scale = nn.Parameter(1 + init_std * torch.randn(site.out_dim))
        self.shift = nn.Parameter(init_std * torch.randn(site.out_dim))

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:
        return scale_shift(y, self.scale, self.shift)

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        bias = _bias(op, "ssf")
        op.linear.weight.mul_(self.scale[:, None])
        bias.mul_(self.scale).add_(self.shift)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        bias = _bias(op, "ssf")
        bias.sub_(self.shift).div_(self.scale)
        op.linear.weight.div_(self.scale[:, None])


PART_NAMES = ("q", "k", "v")


@register_tuner("ia3")
class IA3(Tuner):
    """(IA)³ (Liu et al. 2022, arXiv 2205.05638): learned vectors rescale a frozen linear layer.

    Outputs, ``y = l ⊙ (W x + b)`` (the paper's keys and values: ``parts=["k", "v"]`` on a fused
    ``qkv`` site, or the ``k`` / ``v`` sites themselves), or with ``feedforward=True`` inputs,
    ``y = W (l ⊙ x) + b`` (on the FFN's second layer this rescales its hidden activations, the
    paper's third vector). ``l`` starts at one, the identity. Mergeable: ``merge`` scales the rows
    (outputs, and the bias) or the columns (inputs) of ``W``; ``unmerge`` divides them back.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2205.05638"

    def __init__(self, site: SiteSpec, *, feedforward: bool = False, parts: Sequence[str] | None = None) -> None:
        super().__init__(site)
        self.feedforward = bool(feedforward)
        self.transforms_input = self.feedforward
        split = site.info.get("split", 1)
        if parts is None:
            index = list(range(split))
        elif self.feedforward or split != 3:
            raise ConfigError(f"ia3 'parts' picks outputs of a fused qkv site; {site.name!r} is not one"
                              + (" (and feedforward=True scales inputs)" if self.feedforward else ""))
        else:
            bad = [p for p in parts if p not in PART_NAMES]
            if bad or not parts:
                raise ConfigError(f"ia3 parts {list(parts)!r} must be a non-empty subset of {list(PART_NAMES)}")
            index = sorted(PART_NAMES.index(p) for p in parts)
        self.split, self.index, self.part_dim = split, index, site.out_dim // split
        size = site.dim if self.feedforward else len(index) * self.part_dim
        self.scale = nn.Parameter(torch.ones(size))  # l: (D_in) or (parts x D_part)

    def vector(self) -> Tensor:
        """``l`` over the layer's inputs (feedforward) or all its outputs (ones where no part is scaled)."""
        if self.feedforward or len(self.index) == self.split:
            return self.scale
        chunks = list(self.scale.new_ones(self.split, self.part_dim).unbind(0))
        for j, i in enumerate(self.index):
            chunks[i] = self.scale[j * self.part_dim:(j + 1) * self.part_dim]
        return torch.cat(chunks)

    def reparam_input(self, x: Tensor, op: OpHandle) -> Tensor:
        return x * self.scale if self.feedforward else x

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:
        return y if self.feedforward else scale_shift(y, self.vector())

    def _checked(self, op: OpHandle) -> Tensor:
        vec = self.vector()
        if not torch.all(vec != 0):
            raise PlacementError(f"ia3 at {op.site!r} has a zero scale, which merge could not undo; keep it unmerged")
        return vec

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        vec = self._checked(op)
        if self.feedforward:
            op.linear.weight.mul_(vec[None, :])
            return
        op.linear.weight.mul_(vec[:, None])
        if op.linear.bias is not None:
            op.linear.bias.mul_(vec)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        vec = self._checked(op)
        if self.feedforward:
            op.linear.weight.div_(vec[None, :])
            return
        op.linear.weight.div_(vec[:, None])
        if op.linear.bias is not None:
            op.linear.bias.div_(vec)
