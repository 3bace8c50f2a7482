"""The ``Backbone`` base class: an adapter from one model family to utuning's sites.

A backbone adapter keeps the original model as ``self.model`` (its state-dict keys never
change), re-writes each block as a short explicit forward that calls its frozen operations
through slots, and registers one ``Slot`` per site. Everything it knows about the family lives
in its own module under ``backbones/``; the core only sees sites, slots and handles.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from utuning.errors import ConfigError, SiteError, UnsupportedModelError, closest
from utuning.handle import LinearHandle, OpHandle
from utuning.registry import BACKBONES
from utuning.sites import SiteSpec, match_sites
from utuning.slot import Slot


@dataclass
class Features:
    """Frozen features read by side tuners (and stored by the feature cache).

    layers: block index -> that block's output tokens (B, N, D)
    final:  the last block's output after the final norm (B, N, D)
    pooled: the pre-logits the head reads (B, D)
    mask:   (B, N) bool, True for real tokens (text), or None
    """

    layers: dict[int, Tensor]
    final: Tensor
    pooled: Tensor
    mask: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def detach(self) -> Features:
        return Features(
            {i: t.detach() for i, t in self.layers.items()},
            self.final.detach(),
            self.pooled.detach(),
            None if self.mask is None else self.mask.detach(),
            dict(self.extra),
        )

    def to(self, device: torch.device | str) -> Features:
        return Features(
            {i: t.to(device) for i, t in self.layers.items()},
            self.final.to(device),
            self.pooled.to(device),
            None if self.mask is None else self.mask.to(device),
            dict(self.extra),
        )


def _slot_key(site: str) -> str:
    return site.replace(".", "/")


class Backbone(nn.Module):
    """Base class of backbone adapters. Subclasses implement ``forward`` and ``intermediates``."""

    name = ""
    #: ``wrap`` uses a fallback adapter (the generic one) only when no other adapter accepts the model.
    fallback = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.slots = nn.ModuleDict()

    # Building ---------------------------------------------------------------------------
    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Whether this adapter can wrap ``model`` (used by ``utuning.wrap``)."""
        return False

    @classmethod
    def create(cls, **kwargs: Any) -> Backbone:
        """Build the model (e.g. from a hub name or a local checkpoint) and wrap it."""
        raise NotImplementedError

    def add_site(self, spec: SiteSpec, handle: OpHandle) -> Slot:
        slot = Slot(spec, handle)
        self.slots[_slot_key(spec.name)] = slot
        return slot

    def add_linear_site(self, name: str, layer: nn.Linear, *, index: int | None, split: int = 1,
                        **info: Any) -> Slot:
        """A ``linear`` site over a frozen ``nn.Linear`` (reparam and unfreeze placements): ``split``
        is the number of equal output parts (3 for a fused qkv); ``info`` adds family details
        (``bias``: whether the layer has a bias, default: read from it)."""
        info = {"split": split, "bias": layer.bias is not None, **info}
        spec = SiteSpec(name, "linear", layer.in_features, frozenset({"reparam", "unfreeze"}),
                        out_dim=layer.out_features, layer=index, info=info)
        return self.add_site(spec, LinearHandle(name, layer))

    # Sites ------------------------------------------------------------------------------
    def site_specs(self) -> dict[str, SiteSpec]:
        return {slot.spec.name: slot.spec for slot in self.slots.values()}

    def site_names(self) -> list[str]:
        return [slot.spec.name for slot in self.slots.values()]

    def slot(self, site: str) -> Slot:
        key = _slot_key(site)
        if key not in self.slots:
            raise SiteError(f"{type(self).__name__} has no site {site!r}. Closest: {closest(site, self.site_names())}")
        return self.slots[key]

    def match(self, patterns: str | list[str]) -> list[str]:
        return match_sites(patterns, self.site_names(), owner=f"backbone {self.name!r}")

    def frozen_state_dict(self) -> dict[str, Tensor]:
        """The original model's state dict (same keys as before wrapping)."""
        return self.model.state_dict()

    #: What ``export_native`` writes (``utuning export --out``): ``"file"`` or ``"folder"`` (``utuning.export``).
    native_export = "file"

    def export_native(self, out: Path, tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None) -> list[str]:
        """Write merged frozen weights (``tensors``: the keys of ``frozen_state_dict``) in the form
        the family's own library loads, and return notes for the user (what else was written).

        Default (``native_export = "file"``): one safetensors file of the original model's state
        dict at ``out``, e.g. for ``timm.create_model(name, pretrained=True,
        pretrained_cfg_overlay=dict(file=out))``. An adapter whose library loads folders sets
        ``native_export = "folder"`` and writes into the empty folder ``out`` (Hugging Face:
        ``from_pretrained``). The caller checks ``out`` and renames the result into place
        (``utuning.export``), so this only writes."""
        save_file(dict(tensors), str(out), metadata=dict(metadata or {}))
        return []

    def feature_options(self) -> dict[str, Any]:
        """Settings besides the weights that change ``intermediates`` (e.g. how ``pooled`` is
        formed): part of the feature-cache key, so that changing one rebuilds cached features."""
        return {}

    @property
    def num_layers(self) -> int:
        return sum(1 for s in self.site_specs().values() if s.kind == "block")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing through the wrapped model's own switch (timm's name)."""
        if not hasattr(self.model, "set_grad_checkpointing"):
            raise UnsupportedModelError(f"{type(self.model).__name__} has no set_grad_checkpointing(); "
                                        f"the {self.name!r} backbone adapter must provide one")
        self.model.set_grad_checkpointing(enable)

    # Running ----------------------------------------------------------------------------
    def head(self, pooled: Tensor) -> Tensor:
        """The ``head`` site (with its tuners) on pre-logits (B, D) -> (B, classes): what
        ``forward`` ends with, and what a linear probe trains on cached ``Features.pooled``."""
        raise NotImplementedError

    def intermediates(self, *args: Any, layers: list[int], **kwargs: Any) -> Features:
        """Features of the chosen blocks (for side tuners), through the family's own API."""
        raise NotImplementedError

    def example_inputs(self, batch_size: int = 2) -> Mapping[str, Tensor]:
        """Small valid inputs (keyword arguments of ``forward``) for checks and benchmarks."""
        raise NotImplementedError


def refuse(what: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{what} is not supported: {why}")


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build a registered backbone, e.g. ``build_backbone("vit", model="vit_base_patch16_224")``."""
    return BACKBONES.get(name).create(**kwargs)


def wrap(model: nn.Module, backbone: str | None = None, **kwargs: Any) -> Backbone:
    """Wrap an already-built model with the adapter named ``backbone`` (e.g. ``"generic"``, with its
    ``kwargs`` such as ``example_inputs``), or else with the first registered adapter that accepts
    it, or else, with a warning, with a ``fallback`` adapter (the generic one)."""
    if isinstance(model, Backbone):
        if backbone is not None and backbone != model.name or kwargs:
            raise ConfigError(f"The model is already wrapped by the {model.name!r} adapter; pass the unwrapped model "
                              f"to choose backbone={backbone!r} or its arguments {sorted(kwargs)}")
        return model
    if backbone is not None:
        return _adapt(BACKBONES.get(backbone), model, kwargs)
    adapters = [BACKBONES.get(name) for name in BACKBONES]
    for cls in adapters:
        if not cls.fallback and cls.accepts(model):
            return _adapt(cls, model, kwargs)
    for cls in adapters:
        if cls.fallback and cls.accepts(model):
            warnings.warn(f"No backbone adapter for a {type(model).__module__}.{type(model).__name__}: wrapping it with "
                          f"the {cls.name!r} adapter (sites are its module paths); pass backbone={cls.name!r} to "
                          "choose it explicitly", stacklevel=2)
            return _adapt(cls, model, kwargs)
    raise UnsupportedModelError(
        f"No registered backbone adapter accepts a {type(model).__module__}.{type(model).__name__}; "
        f"registered: {list(BACKBONES)}"
    )


def _adapt(cls: type[Backbone], model: nn.Module, kwargs: dict[str, Any]) -> Backbone:
    """``cls(model, **kwargs)``, with an argument the adapter does not take named."""
    known = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "model")]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(f"The {cls.name!r} backbone adapter takes no argument {unknown[0]!r}; "
                          f"did you mean {closest(unknown[0], known)}? Its arguments: {known}")
    return cls(model, **kwargs)
