"""The ``Tuner`` base class that every PETL method subclasses, and ``TunerSpec``.

A tuner is the ``U`` in ``x' = OP(x) + U(x)`` (U-Tuning, arXiv 2303.00690). It declares a
``placement`` (see ``utuning.slot``), optionally the site kinds it fits and the handle features
it needs, and takes its hyperparameters as keyword-only constructor arguments whose defaults
are the paper's. A new method is a subclass registered with ``@register_tuner("name")``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from utuning.errors import ConfigError, PlacementError, closest
from utuning.handle import OpHandle
from utuning.sites import SiteSpec

#: Placements and whether one tuner instance serves one site (True) or many (False).
PLACEMENTS: Mapping[str, bool] = {
    "parallel": True,
    "sequential": True,
    "prompt": True,
    "prefix": True,
    "reparam": True,
    "replace": True,
    "unfreeze": True,
    "side": False,
}


class Tuner(nn.Module):
    """Base class of all tuners.

    Class attributes a subclass sets:
      placement   one of ``PLACEMENTS``
      site_kinds  site kinds it may attach to (empty: any site offering the placement)
      requires    handle features it needs, e.g. ``{"query"}`` for attention over frozen queries
      paper       link of the method's paper
      from_data   constructor arguments that default to a key of the data's description, e.g.
                  ``{"num_labels": "num_classes"}`` (see ``args_from_data``)
    """

    name: ClassVar[str] = ""
    placement: ClassVar[str] = ""
    site_kinds: ClassVar[frozenset[str]] = frozenset()
    requires: ClassVar[frozenset[str]] = frozenset()
    paper: ClassVar[str] = ""
    from_data: ClassVar[Mapping[str, str]] = {}
    # prompt tuners: keep the prompt outputs after the operation (VPT-shallow) or drop them.
    keep_outputs: bool = False
    # prefix tuners: ask attention for the exact parallel form.
    decomposed: bool = False
    # parallel/sequential tuners: ``forward`` also receives ``mask=`` (B, N) bool, True at real
    # tokens (None: every token real), e.g. to find each row's last real token (LoReFT).
    takes_mask: ClassVar[bool] = False
    # reparam tuners: folded into the frozen layer by ``merge``.
    merged: bool = False
    # reparam tuners: whether ``reparam_input`` changes the layer's input (RepAdapter, IA3 on
    # feed-forward inputs); ``TunedModel.merge`` folds those first (see ``model._merge_order``).
    transforms_input: bool = False

    def __init__(self, site: SiteSpec) -> None:
        super().__init__()
        self.site = site

    def trainable(self, op: OpHandle) -> dict[str, nn.Parameter]:
        """Parameters this tuner trains, by stable name. Default: its own parameters."""
        return dict(self.named_parameters())

    @classmethod
    def check_handle(cls, op: OpHandle) -> None:
        """Fail (before anything is modified) if the site's frozen modules cannot host this tuner,
        e.g. a tuner that trains a LayerNorm on an operation without one. Default: accept."""

    def on_attach(self, op: OpHandle) -> None:
        """Called once the tuner sits in its slot (e.g. to copy frozen weights it starts from)."""

    @classmethod
    def shared_state(cls, sites: Sequence[SiteSpec], args: Mapping[str, Any]) -> nn.Module | None:
        """State shared by every instance one spec attaches, built once from all the spec's sites
        before any instance (VeRA's frozen random projections, FacT's factors shared across
        layers). Its parameters are trained, its buffers saved, under ``shared.{key}.{name}``
        (``key``: the spec's ``key`` or the tuner's name). Default: nothing shared."""
        return None

    def bind_shared(self, shared: nn.Module) -> None:
        """Give this instance its spec's shared state (not registered as a submodule here: the
        ``TunedModel`` owns it once, so it is neither duplicated nor saved per site)."""
        self.__dict__["_shared"] = shared

    @property
    def shared(self) -> nn.Module:
        """The state shared with the other instances of this spec (see ``shared_state``)."""
        if "_shared" not in self.__dict__:
            raise PlacementError(f"Tuner {self.name!r} at {self.site.name!r} shares state across sites; "
                                 "attach it with utuning.tune(...), which builds that state")
        return self.__dict__["_shared"]

    def reparam_input(self, x: Tensor, op: OpHandle) -> Tensor:
        """reparam tuners: the input the frozen linear layer receives (IA3 on feed-forward layers
        scales it); ``forward(x, y, op)`` then gets the original ``x`` and the layer's output ``y``.
        Default: ``x`` unchanged."""
        return x

    def merge(self, op: OpHandle) -> None:
        raise PlacementError(f"Tuner {self.name!r} cannot be merged into the frozen weights")

    def unmerge(self, op: OpHandle) -> None:
        raise PlacementError(f"Tuner {self.name!r} cannot be merged into the frozen weights")

    @classmethod
    def check_site(cls, site: SiteSpec) -> None:
        """Fail (before anything is built) if this tuner cannot live on ``site``."""
        if cls.placement not in site.placements:
            why = site.refused.get(cls.placement)
            offered = sorted(site.placements)
            raise PlacementError(
                f"Tuner {cls.name!r} needs placement {cls.placement!r}, which site {site.name!r} "
                + (f"cannot take: {why}" if why else f"does not offer (it offers {offered})")
            )
        if cls.site_kinds and site.kind not in cls.site_kinds:
            raise PlacementError(
                f"Tuner {cls.name!r} attaches to {sorted(cls.site_kinds)} sites, not to {site.kind!r} site {site.name!r}"
            )
        missing = cls.requires - site.features
        if missing:
            why = "; ".join(site.refused[m] for m in sorted(missing) if m in site.refused)
            raise PlacementError(
                f"Tuner {cls.name!r} needs {sorted(missing)} from site {site.name!r}, which offers "
                f"{sorted(site.features)}" + (f": {why}" if why else "")
            )

    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """Keyword-only constructor arguments and their defaults (``inspect.Parameter.empty`` if required)."""
        sig = inspect.signature(cls.__init__)
        return {
            n: p.default
            for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    @classmethod
    def check_args(cls, args: Mapping[str, Any]) -> None:
        known = cls.hyperparameters()
        for key in args:
            if key not in known:
                raise ConfigError(
                    f"Tuner {cls.name!r} has no argument {key!r}. Did you mean {closest(key, known)}? "
                    f"Arguments: {sorted(known)}"
                )
        required = [k for k, v in known.items() if v is inspect.Parameter.empty and k not in args]
        if required:
            raise ConfigError(f"Tuner {cls.name!r} needs argument(s) {required}")

    @classmethod
    def args_from_data(cls, args: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments ``data`` (e.g. ``{"num_classes": 6, "label_names": [...]}``) gives this
        tuner through ``from_data``: unset (or None) arguments are filled; a set one that differs
        from the data is a ``ConfigError`` naming the tuner, argument and both values."""
        out: dict[str, Any] = {}
        for arg, key in cls.from_data.items():
            value = data.get(key)
            if value is None:
                continue
            value = list(value) if isinstance(value, (list, tuple)) else value
            given = args.get(arg)
            if given is None:
                out[arg] = value
                continue
            n = len(given) if isinstance(given, (list, tuple)) else given
            m = len(value) if isinstance(value, list) else value
            mine = list(given) if isinstance(given, (list, tuple)) else given
            if n != m or (isinstance(mine, list) and isinstance(value, list)
                          and [str(v) for v in mine] != [str(v) for v in value]
                          and not all(str(v).lstrip("-").isdigit() for v in value)):
                raise ConfigError(f"Tuner {cls.name!r} argument {arg}={given!r} does not match the data's "
                                  f"{key}={value!r}; drop {arg!r} to take the data's, or fix it")
        return out

    def extra_repr(self) -> str:
        return f"site={self.site.name!r}"


class SideTuner(Tuner):
    """A tuner beside the backbone: it reads detached features of the blocks its pattern
    selects (``Features``, see ``utuning.backbone``) and returns its own outputs, so the
    backbone runs without gradients (Y-Tuning, Res-Tuning-Bypass)."""

    placement = "side"

    def __init__(self, sites: Sequence[SiteSpec]) -> None:
        super().__init__(sites[0])
        self.sites = tuple(sites)

    @classmethod
    def check_site(cls, site: SiteSpec) -> None:
        """Side tuners read the outputs of whole blocks: block sites with a layer index."""
        if site.kind != "block" or site.layer is None:
            raise PlacementError(
                f"Side tuner {cls.name!r} reads the output of whole blocks; site {site.name!r} is a {site.kind!r} "
                f"site. Select blocks, e.g. at='blocks.*' or 'blocks.{{8..11}}'"
            )

    def on_attach(self, backbone) -> None:  # type: ignore[override]
        """Called with the (frozen) ``Backbone`` once attached, e.g. to initialise label
        embeddings from the frozen model's embeddings through a site handle."""

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.sites if s.layer is not None})


@dataclass
class TunerSpec:
    """What to attach: a registered tuner ``name`` at sites matching ``at``, with ``args``.

    ``key`` names a side tuner's output (its task) when several share one backbone pass.
    """

    name: str
    at: str | Sequence[str]
    args: dict[str, Any] = field(default_factory=dict)
    key: str | None = None

    @classmethod
    def coerce(cls, value: Any) -> TunerSpec:
        if isinstance(value, TunerSpec):
            return value
        if isinstance(value, (tuple, list)) and 2 <= len(value) <= 3:
            return cls(value[0], value[1], dict(value[2]) if len(value) == 3 else {})
        if isinstance(value, Mapping):
            unknown = set(value) - {"name", "at", "args", "key"}
            if unknown:
                bad = sorted(unknown)[0]
                raise ConfigError(
                    f"Tuner entry has unknown key {bad!r}; did you mean {closest(bad, ['name', 'at', 'args', 'key'])}?"
                )
            if "name" not in value or "at" not in value:
                raise ConfigError(f"Tuner entry {dict(value)!r} needs 'name' and 'at'")
            at = value["at"]
            at = at if isinstance(at, str) else list(at)
            return cls(value["name"], at, dict(value.get("args") or {}), value.get("key"))
        raise ConfigError(f"Cannot read a tuner spec from {value!r}; use {{'name': ..., 'at': ..., 'args': {{...}}}}")

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "at": self.at if isinstance(self.at, str) else list(self.at), "args": dict(self.args)}
        if self.key is not None:
            d["key"] = self.key
        return d
