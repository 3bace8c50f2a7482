"""The pieces through which the generic adapter (``generic.py``) sees a model's submodules.

``SiteModule`` replaces a site module in its parent. It *shares* the module's own parameter,
buffer and child tables (the same dict objects, not copies) and holds the module itself,
unregistered, to call it: state-dict keys, ``named_parameters``, ``.to()``, ``load_state_dict``
and ``train()`` act on exactly the original tensors and flags, and attribute access and
indexing reach the original module. Its forward calls the module and applies the site's tuners
(U-Tuning's ``x' = OP(x) + U(x)``, arXiv 2303.00690) on tokens: maps (B, C, H, W) are read as
(B, H·W, C).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utuning.errors import UnsupportedModelError
from utuning.handle import OpHandle
from utuning.slot import Slot


@contextmanager
def fused_attention_off() -> Iterator[None]:
    """PyTorch's fused inference path of ``nn.TransformerEncoderLayer`` / ``MultiheadAttention``
    computes the whole layer in one kernel, skipping the submodules (and the slots) inside it."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def to_tokens(t: Tensor) -> Tensor:
    """(B, D) -> (B, 1, D); (B, N, D) unchanged; (B, C, *spatial) -> (B, prod(spatial), C)."""
    if t.dim() == 2:
        return t[:, None]
    return t if t.dim() == 3 else t.flatten(2).transpose(1, 2)


def from_tokens(tokens: Tensor, like: Tensor) -> Tensor:
    """Inverse of ``to_tokens`` for a tensor shaped like ``like``."""
    if like.dim() == 2:
        return tokens[:, 0]
    return tokens if like.dim() == 3 else tokens.transpose(1, 2).reshape(like.shape)


def feature_width(t: Tensor) -> int:
    """Channels of a map (B, C, ...), features of tokens (B, N, D) or (B, D)."""
    return t.shape[1] if t.dim() >= 4 else t.shape[-1]


@dataclass
class Recorder:
    """Outputs of chosen block sites during one ``intermediates`` call (None outside it)."""

    layers: frozenset[int] | None = None
    found: dict[int, Tensor] = field(default_factory=dict)
    sequence_first: bool = False

    def note(self, layer: int | None, y: Tensor) -> None:
        if self.layers is not None and layer in self.layers:
            y = y.transpose(0, 1) if self.sequence_first and y.dim() == 3 else y
            self.found[layer] = to_tokens(y)  # (B, N, D)


class ModuleHandle(OpHandle):
    """Handle of a module site: the frozen module; its parameters keep their own names."""

    def __init__(self, site: str, module: nn.Module) -> None:
        super().__init__(site, {"": module})
        self.module = module

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.module.named_parameters()


class SiteModule(nn.Module):
    """A frozen module seen through its site's slot (see the module docstring: it shares the
    module's parameter, buffer and child tables, so nothing about the frozen state changes)."""

    def __init__(self, module: nn.Module, slot: Slot, recorder: Recorder, layer: int | None) -> None:
        super().__init__()
        for table in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[table] = module.__dict__[table]
        self.__dict__["op"] = module  # unregistered: its tensors are reached through the shared tables
        self.__dict__["slot"] = slot  # registered once, in the backbone adapter
        self.__dict__["recorder"] = recorder
        self.layer = layer
        self.training = module.training
        self._version = getattr(module, "_version", 1)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        slot = self.slot
        if slot.of("reparam"):  # linear, conv and embedding sites: one input
            return slot.linear(args[0] if args else next(iter(kwargs.values())), self.op)
        y = self.op(*args, **kwargs)
        if slot.of("parallel") or slot.of("sequential"):
            y = self._around(args[0], y)  # the dry run saw a positional tensor input
        if isinstance(y, Tensor):
            self.recorder.note(self.layer, y)
        return y

    def _around(self, x: Tensor, y: Tensor) -> Tensor:
        """``OP(x) + U(x)`` / ``+ U(OP(x))`` on tokens: maps as (B, H·W, C), the input pooled to
        the output's spatial size."""
        if not isinstance(y, Tensor) or y.dim() != x.dim():
            raise UnsupportedModelError(f"Site {self.slot.spec.name!r} returned {type(y).__name__} for a "
                                        f"{tuple(x.shape)} input, unlike in the dry run; its tuners need one tensor")
        if x.dim() >= 4 and x.shape[2:] != y.shape[2:]:
            x = F.adaptive_avg_pool3d(x, y.shape[2:]) if x.dim() == 5 else F.adaptive_avg_pool2d(x, y.shape[2:])
        y_tokens = to_tokens(y)
        return from_tokens(self.slot.apply(to_tokens(x), lambda _x, _m: y_tokens), like=y)

    def train(self, mode: bool = True) -> SiteModule:
        super().train(mode)
        self.op.training = mode  # the module reads its own flag (dropout, batch norm)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # the module's parameters, buffers and children
        except AttributeError:
            op = self.__dict__.get("op")
            if op is None:
                raise
            return getattr(op, name)  # its other attributes (out_channels, batch_first...)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        self.op._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
        self.op._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"site={self.slot.spec.name!r}, op={type(self.op).__name__}: {self.op.extra_repr()}"


class SiteContainer(SiteModule):
    """A ``SiteModule`` for ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict``: indexing,
    iteration and ``len`` reach the container (and so its children, themselves site modules)."""

    def __getitem__(self, index: Any) -> Any:
        return self.op[index]

    def __len__(self) -> int:
        return len(self.op)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.op)


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
