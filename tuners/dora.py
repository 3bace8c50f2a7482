"""DoRA: LoRA on the direction of a frozen weight, with its row magnitudes trained apart."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from utuning.errors import PlacementError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuners.lora import LoRA


@register_tuner("dora")
class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353):

        W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row,   ΔW = s·B A   (LoRA's update, same arguments)

    ``m`` (D_out) starts at the row norms of the frozen ``W``, and ``B`` at zero, so the tuner
    starts as the identity. The norm is treated as a constant in the backward pass (paper Sec. 4.3,
    as HF PEFT does). Computed from the frozen layer's output, with the bias ``b`` kept outside the
    scaling: ``y' = (m/n) ⊙ (y − b + s·B A x) + b``. ``merge`` writes ``W' `` into the frozen weight
    and remembers the norm it divided by, so ``unmerge`` restores ``W`` exactly (up to rounding).
    Every LoRA option applies (``rslora``, ``init: pissa|olora``, ``parts``, ``fused``).
    """

    paper = "https://arxiv.org/abs/2402.09353"

    def __init__(self, site: SiteSpec, **lora_args) -> None:
        super().__init__(site, **lora_args)
        self.magnitude = nn.Parameter(torch.ones(site.out_dim))  # m: (D_out), set from W on attach
        self.register_buffer("merged_norm", torch.ones(site.out_dim), persistent=False)

    # The keyword-only arguments are LoRA's: expose them for argument checks and `utuning list`.
    @classmethod
    def hyperparameters(cls) -> dict:
        return LoRA.hyperparameters()

    @torch.no_grad()
    def on_attach(self, op: OpHandle) -> None:
        super().on_attach(op)
        self.magnitude.copy_(self.weight_norm(op))

    def weight_norm(self, op: OpHandle) -> Tensor:
        """``‖W + ΔW‖`` over each output row, (D_out), without gradient."""
        with torch.no_grad():
            w = op.linear.weight
            return torch.linalg.norm(w + self.delta_weight().to(w.dtype), dim=1)

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (..., D_in), y (..., D_out)
        scale = self.magnitude / self.weight_norm(op)  # (D_out)
        bias = op.linear.bias
        base = y if bias is None else y - bias
        return super().forward(x, base, op) * scale + (0 if bias is None else bias)

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        norm = self.weight_norm(op)
        if not torch.all(norm > 0):
            raise PlacementError(f"dora at {op.site!r}: a row of W + ΔW is zero, which merge could not undo")
        self.merged_norm.copy_(norm)
        w = op.linear.weight
        w.add_(self.delta_weight().to(w.dtype)).mul_((self.magnitude / norm)[:, None].to(w.dtype))

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        w = op.linear.weight
        w.mul_((self.merged_norm / self.magnitude)[:, None].to(w.dtype)).sub_(self.delta_weight().to(w.dtype))
