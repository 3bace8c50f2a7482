"""GLoRA: a generalised scale-and-shift of a frozen layer's weight, bias and input."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.errors import PlacementError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner
from utuning.tuners._common import choice, positive

KINDS = ("lora", "vector", "constant", "none")


class Support(nn.Module):
    """One GLoRA support tensor of shape (rows, cols): low-rank ``up @ down`` (``up`` zero), a
    vector (rows, 1), a constant (1, 1) or nothing; every kind starts at zero."""

    def __init__(self, kind: str, rows: int, cols: int, rank: int) -> None:
        super().__init__()
        self.kind, self.shape = kind, (rows, cols)
        if kind == "lora":
            self.down = nn.Parameter(torch.empty(rank, cols))
            self.up = nn.Parameter(torch.zeros(rows, rank))
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        elif kind == "vector":
            self.value = nn.Parameter(torch.zeros(rows, 1))
        elif kind == "constant":
            self.value = nn.Parameter(torch.zeros(1, 1))

    def forward(self) -> Tensor | None:  # broadcastable to (rows, cols), or None
        if self.kind == "lora":
            return self.up @ self.down
        return None if self.kind == "none" else self.value

    def extra_repr(self) -> str:
        return self.kind


@register_tuner("glora")
class GLoRA(Tuner):
    """Generalised LoRA (Chavan et al. 2023, arXiv 2306.07967, Eq. 10):
    ``y = (W + W ⊙ A + B) x + W C + b + b ⊙ D + E`` with support tensors ``A``, ``B`` (D_out, D_in),
    ``C`` (D_in, 1), ``D``, ``E`` (D_out, 1), each low-rank (``lora``), a ``vector``, a
    ``constant`` or ``none``; all start at zero (identity). Mergeable:
    ``W' = W + W ⊙ A + B``, ``b' = b + b ⊙ D + E + W C``; ``unmerge`` divides by ``1 + A`` and
    ``1 + D`` (refused where they are zero). The paper picks each tensor's kind per layer by an
    evolutionary search over a trained super-network; that search is **not** implemented here:
    the kinds are fixed arguments (defaults: low-rank ``A``, ``B``, vectors ``C``, ``D``, ``E``,
    ``rank=4``, from the paper's search space).
    """

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2306.07967"

    def __init__(self, site: SiteSpec, *, rank: int = 4, a: str = "lora", b: str = "lora", c: str = "vector",
                 d: str = "vector", e: str = "vector") -> None:
        super().__init__(site)
        positive("rank", rank)
        o, i = site.out_dim, site.dim
        for arg, kind, ok in (("a", a, KINDS), ("b", b, KINDS), ("c", c, KINDS), ("d", d, KINDS[1:]), ("e", e, KINDS[1:])):
            choice(arg, kind, ok)
        self.A, self.B = Support(a, o, i, rank), Support(b, o, i, rank)
        self.C = Support(c, i, 1, rank)
        # D scales the frozen bias: on a layer without one it could never learn, so it is left out.
        d = d if site.info.get("bias", True) else "none"
        self.D, self.E = Support(d, o, 1, rank), Support(e, o, 1, rank)

    def _delta(self, w: Tensor, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The updates ``W ⊙ A + B`` (D_out, D_in) and ``b ⊙ D + E + W C`` (D_out) of the frozen
        ``w``, ``bias`` (None where every term is absent)."""
        a, b, c, d, e = (None if t is None else t.to(w.dtype) for t in (self.A(), self.B(), self.C(), self.D(), self.E()))
        dw = None if a is None else w * a
        dw = dw if b is None else (b if dw is None else dw + b)
        db = [t for t in (None if bias is None or d is None else bias * d[:, 0],
                          None if e is None else e[:, 0].expand(w.shape[0]),
                          None if c is None else (w @ c)[:, 0]) if t is not None]
        return dw, (sum(db) if db else None)

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # x (..., D_in), y (..., D_out)
        dw, db = self._delta(op.linear.weight, op.linear.bias)
        if dw is None:
            return y if db is None else y + db
        return y + F.linear(x, dw, db)

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        if op.linear.bias is None and any(s.kind != "none" for s in (self.C, self.E)):
            raise PlacementError(f"glora cannot merge into {op.site!r}: C and E need the frozen layer's bias")
        dw, db = self._delta(op.linear.weight.double(), None if op.linear.bias is None else op.linear.bias.double())
        if db is not None:
            op.linear.bias += db.to(op.linear.bias.dtype)
        if dw is not None:
            op.linear.weight += dw.to(op.linear.weight.dtype)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        a, b, c, d, e = (None if t is None else t.double() for t in (self.A(), self.B(), self.C(), self.D(), self.E()))
        for name, t in (("A", a), ("D", d)):
            if t is not None and torch.any(1 + t == 0):
                raise PlacementError(f"glora at {op.site!r}: 1 + {name} has zeros, which unmerge cannot divide by")
        w = op.linear.weight.double()
        w = w if b is None else w - b
        w = w if a is None else w / (1 + a)
        if op.linear.bias is not None:
            bias = op.linear.bias.double()
            bias = bias if e is None else bias - e[:, 0]
            bias = bias if c is None else bias - (w @ c)[:, 0]
            bias = bias if d is None else bias / (1 + d[:, 0])
            op.linear.bias.copy_(bias)
        op.linear.weight.copy_(w)
