"""OFT: a block-diagonal orthogonal rotation of a frozen linear layer's inputs, mergeable."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from utuning.errors import ConfigError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import choice, positive


@register_tuner("oft")
class OFT(Tuner):
    """Orthogonal fine-tuning (Qiu et al. 2023, arXiv 2306.07280; OFTv2, arXiv 2506.19847):

        y = W Rᵀ x + b,   R = diag(R_1, ..., R_k),   R_i = (I − Q_i)(I + Q_i)⁻¹,   Q_i = −Q_iᵀ

    Each ``block_size`` × ``block_size`` block is the Cayley transform of a skew-symmetric
    ``Q_i`` (its ``block_size·(block_size−1)/2`` upper entries are the parameters, at zero: R = I,
    identity at init). ``cayley: neumann`` replaces the inverse by ``I + 2Q + 2Q² + ... + Q^{t−1}``
    (``neumann_terms`` = t, OFTv2's cheaper form and HF PEFT's default, truncated as PEFT does); ``exact`` is the paper's.
    ``block_share`` uses one block for all. The rotation acts on the layer's inputs, as in HF PEFT,
    so ``merge`` writes ``W Rᵀ`` into the frozen weight and ``unmerge`` multiplies by ``(Rᵀ)⁻¹``.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2306.07280"

    def __init__(self, site: SiteSpec, *, block_size: int = 32, block_share: bool = False,
                 cayley: str = "exact", neumann_terms: int = 5) -> None:
        super().__init__(site)
        positive("block_size", block_size, 2)
        if site.dim % block_size:
            raise ConfigError(f"oft block_size={block_size} does not divide the input width {site.dim} of "
                              f"{site.name!r}; choose a divisor")
        self.cayley = choice("cayley", cayley, ("exact", "neumann"))
        positive("neumann_terms", neumann_terms, 2)
        self.block_size, self.neumann_terms = block_size, neumann_terms
        self.blocks = site.dim // block_size
        self.weight = nn.Parameter(torch.zeros(1 if block_share else self.blocks, block_size * (block_size - 1) // 2))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def rotations(self) -> Tensor:
        """The blocks ``R_i``, (k, block, block)."""
        n, b = self.weight.shape[0], self.block_size
        q = self.weight.new_zeros(n, b, b)
        q[:, self.rows, self.cols] = self.weight
        q = q - q.transpose(-2, -1)  # skew-symmetric: (n, b, b)
        eye = torch.eye(b, dtype=q.dtype, device=q.device).expand(n, b, b)
        if self.cayley == "exact":
            r = torch.linalg.solve(eye + q, eye - q, left=False)  # (I − Q)(I + Q)⁻¹
        else:
            # HF PEFT's truncation, kept term for term so its adapters load unchanged: I + 2Q, then
            # 2Q² ... 2Q^(t−2) and a last Q^(t−1) (with t = 3 it still ends on Q³).
            r = eye + 2 * q
            if self.neumann_terms > 2:
                power = q @ q
                r = r + 2 * power
                for _ in range(3, self.neumann_terms - 1):
                    power = power @ q
                    r = r + 2 * power
                r = r + power @ q
        return r.expand(self.blocks, b, b) if n == 1 else r

    def matrix(self) -> Tensor:
        """The block-diagonal ``R``, (D_in, D_in)."""
        return torch.block_diag(*self.rotations().unbind(0))

    def reparam_input(self, x: Tensor, op: OpHandle) -> Tensor:  # (..., D_in): each block x_i -> x_i R_i
        blocks = x.unflatten(-1, (self.blocks, self.block_size))  # (..., k, block)
        return torch.einsum("...kb,kbc->...kc", blocks, self.rotations().to(x.dtype)).flatten(-2)

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:
        return y

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        w = op.linear.weight
        w.copy_((w.double() @ self.matrix().double().T).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        w = op.linear.weight
        w.copy_((w.double() @ torch.linalg.inv(self.matrix().double().T)).to(w.dtype))
