"""A slot holds the tuners attached at one site and applies them around its frozen operation.

Backbone adapters re-write each block as a short explicit forward that calls its frozen
operations through slots; a slot with no tuners returns exactly what the operation returns.
The placements (what a tuner's ``forward`` receives and returns):

=============  ==========================================================================
parallel       ``y = OP(x) + U(x)``: ``forward(x, op) -> (B, N, D_out)`` reads OP's input
sequential     ``y = OP(x); y = y + U(y)``: ``forward(y, op) -> (B, N, D_out)``
               (both: ``forward(.., op, mask=)`` with the padding mask if ``takes_mask``)
prompt         tokens inserted after the class/register tokens before OP and removed after
               it (unless ``keep_outputs``): ``forward(batch_size, op) -> (B, P, D)``
prefix         keys/values joined inside attention: ``forward(batch_size, op) -> (k, v)``,
               each (B, H, P, Dh); ``decomposed`` tuners ask for the exact parallel form
reparam        on linear sites, ``y = U(x, y)`` after the frozen linear, mergeable into it:
               ``forward(x, y, op) -> y``, ``merge(op)``, ``unmerge(op)``
replace        ``y = U(x)`` instead of OP (a trainable head): ``forward(x, op)``
unfreeze       trains OP's own parameters (full fine-tuning): no forward
side           reads detached features of many layers (``utuning.model``)
=============  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from utuning.attention import KV
from utuning.errors import PlacementError
from utuning.handle import OpHandle
from utuning.sites import SiteSpec

Op = Callable[[Tensor, Tensor | None], Tensor]


def insert_tokens(x: Tensor, tokens: Tensor, after: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Insert ``tokens`` (B, P, D) into ``x`` (B, N, D) after its first ``after`` tokens."""
    x = torch.cat([x[:, :after], tokens.to(x.dtype), x[:, after:]], dim=1)
    if mask is not None:
        mask = torch.cat([mask[:, :after], mask.new_ones(mask.shape[0], tokens.shape[1]), mask[:, after:]], dim=1)
    return x, mask


def remove_tokens(x: Tensor, count: int, after: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Remove ``count`` tokens that ``insert_tokens`` put after the first ``after`` tokens."""
    if count == 0:
        return x, mask
    x = torch.cat([x[:, :after], x[:, after + count :]], dim=1)
    if mask is not None:
        mask = torch.cat([mask[:, :after], mask[:, after + count :]], dim=1)
    return x, mask


class Slot(nn.Module):
    """The tuners at one site. Registered by the backbone adapter, called by its blocks."""

    def __init__(self, spec: SiteSpec, handle: OpHandle) -> None:
        super().__init__()
        self.spec = spec
        self.handle = handle  # plain object: references to the frozen modules, not registered here
        self.tuners = nn.ModuleDict()
        self._by_placement: dict[str, list[nn.Module]] = {}

    def add(self, tuner: nn.Module) -> None:
        if tuner.name in self.tuners:
            raise PlacementError(f"Site {self.spec.name!r} already has a {tuner.name!r} tuner; attach it once")
        self.tuners[tuner.name] = tuner
        self._by_placement.setdefault(tuner.placement, []).append(tuner)

    def remove(self, name: str) -> nn.Module:
        tuner = self.tuners[name]
        del self.tuners[name]
        self._by_placement[tuner.placement].remove(tuner)
        return tuner

    def of(self, placement: str) -> list[nn.Module]:
        return self._by_placement.get(placement, [])

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.tuners.values())

    def __len__(self) -> int:
        return len(self.tuners)

    # Operations ---------------------------------------------------------------------------
    def around(self, x: Tensor, op: Op, mask: Tensor | None = None,
               handle: OpHandle | None = None) -> tuple[Tensor, Tensor | None]:
        """Apply the frozen ``op`` to ``x`` (B, N, D) with this site's tuners around it. ``handle``:
        the site's handle bound to this call (what it offers may depend on the call, e.g. a
        decoder's positions); the slot's own handle by default."""
        if not self.tuners:
            return op(x, mask), mask
        handle = self.handle if handle is None else handle
        inserted = 0
        after = self.spec.prefix_tokens
        # Kept prompts go in first, so the ones removed after OP sit right after the prefix tokens.
        for tuner in sorted(self.of("prompt"), key=lambda t: not t.keep_outputs):
            tokens = tuner(x.shape[0], handle)  # (B, P, D)
            x, mask = insert_tokens(x, tokens, after, mask)
            if not tuner.keep_outputs:
                inserted += tokens.shape[1]
        replace = self.of("replace")
        y = self.beside(x, replace[-1](x, handle) if replace else op(x, mask), mask, handle)
        if inserted:
            y, mask = remove_tokens(y, inserted, after, mask)
        return y, mask

    def beside(self, x: Tensor, y: Tensor, mask: Tensor | None = None, handle: OpHandle | None = None) -> Tensor:
        """``y = OP(x)`` plus the parallel tuners of ``x``, then the sequential tuners of ``y``.
        Tuners with ``takes_mask`` also get ``mask=``: (B, N) bool, True at real tokens, or None
        (every token real). ``handle``: as in ``around``."""
        handle = self.handle if handle is None else handle
        for tuner in self.of("parallel"):
            y = y + (tuner(x, handle, mask=mask) if tuner.takes_mask else tuner(x, handle))
        for tuner in self.of("sequential"):
            y = y + (tuner(y, handle, mask=mask) if tuner.takes_mask else tuner(y, handle))
        return y

    def apply(self, x: Tensor, op: Op, mask: Tensor | None = None, handle: OpHandle | None = None) -> Tensor:
        """``around`` for operations that keep the token count (attn, mlp, head)."""
        return self.around(x, op, mask, handle)[0]

    def linear(self, x: Tensor, layer: nn.Module) -> Tensor:
        """A frozen linear layer with its reparameterisation tuners (LoRA, SSF, BitFit, IA3)."""
        tuners = [t for t in self.of("reparam") if not t.merged]
        h = x
        for tuner in tuners:
            h = tuner.reparam_input(h, self.handle)
        y = layer(h)
        for tuner in tuners:
            y = tuner(x, y, self.handle)
        return y

    def prefixes(self, batch_size: int) -> tuple[list[KV], bool]:
        """Learned (k, v) pairs for attention, and whether any tuner asks for the parallel form."""
        tuners = self.of("prefix")
        return [t(batch_size, self.handle) for t in tuners], any(t.decomposed for t in tuners)
