"""VeRA: frozen random projections shared by every layer, trained scaling vectors per layer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import AdditiveMerge, positive


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform (gain sqrt(2), fan-in) drawn from ``generator``: HF PEFT's ``_kaiming_init``,
    so the same seed gives PEFT's projections."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen random ``A`` (r, max D_in) and ``B`` (max D_out, r) all sites slice from (buffers:
    saved with the tuner weights, never trained)."""

    def __init__(self, rank: int, max_in: int, max_out: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        self.register_buffer("vera_A", kaiming_uniform((rank, max_in), g))  # (r, D_in max)
        self.register_buffer("vera_B", kaiming_uniform((max_out, rank), g))  # (D_out max, r)


@register_tuner("vera")
class VeRA(AdditiveMerge, Tuner):
    """Vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv 2310.11454):
    ``y = W x + Λ_b B Λ_d A x`` with ``A`` (r, D_in) and ``B`` (D_out, r) frozen random matrices
    **shared by every site of the spec** (sliced to each layer's widths, as in the paper and HF
    PEFT) and trained vectors ``λ_d`` (r) and ``λ_b`` (D_out). ``λ_b`` starts at zero (identity),
    ``λ_d`` at ``d_initial``. Paper / PEFT defaults: ``rank=256``, ``d_initial=0.1``,
    ``projection_seed=0`` (PEFT's ``projection_prng_key``: the same seed gives PEFT's ``A`` and
    ``B``). Mergeable: ``W' = W + Λ_b B Λ_d A``.
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2310.11454"

    def __init__(self, site: SiteSpec, *, rank: int = 256, d_initial: float = 0.1, dropout: float = 0.0,
                 projection_seed: int = 0) -> None:
        super().__init__(site)
        positive("rank", rank)
        self.dropout = nn.Dropout(dropout)
        self.lambda_d = nn.Parameter(torch.full((rank,), float(d_initial)))  # (r)
        self.lambda_b = nn.Parameter(torch.zeros(site.out_dim))  # (D_out)

    @classmethod
    def shared_state(cls, sites: Sequence[SiteSpec], args: Mapping[str, Any]) -> nn.Module:
        rank = args.get("rank", cls.hyperparameters()["rank"])
        positive("rank", rank)
        return VeRAProjections(rank, max(s.dim for s in sites), max(s.out_dim for s in sites),
                               args.get("projection_seed", 0))

    def projections(self) -> tuple[Tensor, Tensor]:
        """This layer's slices of the shared ``A`` (r, D_in) and ``B`` (D_out, r)."""
        return self.shared.vera_A[:, : self.site.dim], self.shared.vera_B[: self.site.out_dim]

    def delta_weight(self) -> Tensor:
        a, b = self.projections()
        return (self.lambda_b[:, None] * b) @ (self.lambda_d[:, None] * a)  # (D_out, D_in)

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (..., D_in), y (..., D_out)
        a, b = self.projections()
        return y + self.lambda_b * F.linear(self.lambda_d * F.linear(self.dropout(x), a), b)

