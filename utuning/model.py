"""``TunedModel``: a frozen backbone with tuners attached at its sites.

Everything is checked before the backbone is touched: tuner names, site patterns, placements,
handle features and tuner arguments. Trainable parameters are found by walking the attached
tuners, never by matching parameter names, and the tuner state dict uses stable keys
``{site}.{tuner}.{param}`` (side tuners: ``side.{key}.{param}``) that do not depend on
wrappers such as DDP or ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from utuning.backbone import Backbone, Features, wrap
from utuning.errors import ConfigError, PlacementError, StateDictError
from utuning.handle import OpHandle
from utuning.registry import COMPOSITIONS, TUNERS
from utuning.tuner import PLACEMENTS, Tuner, TunerSpec


@dataclass
class Attached:
    """One attached tuner: its stable key, sites, handle (None for side tuners) and module."""

    key: str
    sites: tuple[str, ...]
    tuner: Tuner
    handle: OpHandle | None
    # The key of the state this tuner shares with the other instances of its spec, if any.
    shared_key: str | None = None

    def state(self) -> dict[str, Tensor]:
        if self.handle is not None and self.tuner.placement == "unfreeze":
            return self.tuner.trainable(self.handle)
        return self.tuner.state_dict(keep_vars=True)

    def trainable(self) -> dict[str, nn.Parameter]:
        return self.tuner.trainable(self.handle) if self.handle is not None else dict(self.tuner.named_parameters())


def expand_specs(specs: Iterable[Any]) -> list[TunerSpec]:
    """Coerce specs and expand registered compositions (Dual-/Tri-U-Tuner...) into tuner specs."""
    out: list[TunerSpec] = []
    for raw in specs:
        spec = TunerSpec.coerce(raw)
        if spec.name in COMPOSITIONS and spec.name not in TUNERS:
            out.extend(expand_specs(COMPOSITIONS.get(spec.name)(at=spec.at, **spec.args)))
        else:
            out.append(spec)
    return out


def unwrap(model: nn.Module) -> TunedModel:
    """The ``TunedModel`` inside DDP / FSDP / ``torch.compile`` wrappers."""
    seen = model
    while not isinstance(seen, TunedModel):
        inner = getattr(seen, "_orig_mod", None) or getattr(seen, "module", None)
        if inner is None:
            raise ConfigError(f"{type(model).__name__} does not wrap a TunedModel")
        seen = inner
    return seen


class TunedModel(nn.Module):
    """A frozen backbone plus tuners. ``forward`` returns the backbone's outputs (logits), or
    the side tuners' outputs (a tensor for one, a dict by key for several)."""

    def __init__(self, backbone: Backbone | nn.Module, tuners: Sequence[Any] = ()) -> None:
        super().__init__()
        backbone = wrap(backbone)
        specs = expand_specs(tuners)
        planned = self._plan(backbone, specs)  # raises before anything is modified
        self.backbone = backbone
        self.side = nn.ModuleDict()
        self.shared = nn.ModuleDict()  # state shared across the sites of one spec (Tuner.shared_state)
        self.specs = specs
        self._attached: list[Attached] = []
        backbone.model.requires_grad_(False)
        for attached in planned:
            if attached.handle is None:
                self.side[attached.key.removeprefix("side.")] = attached.tuner
                attached.tuner.on_attach(backbone)
            else:
                backbone.slot(attached.sites[0]).add(attached.tuner)
                attached.tuner.on_attach(attached.handle)
            if attached.shared_key is not None and attached.shared_key not in self.shared:
                self.shared[attached.shared_key] = attached.tuner.shared
                for p in attached.tuner.shared.parameters():
                    p.requires_grad_(True)
            for p in attached.trainable().values():
                p.requires_grad_(True)
            self._attached.append(attached)

    @staticmethod
    def _plan(backbone: Backbone, specs: list[TunerSpec]) -> list[Attached]:
        site_specs = backbone.site_specs()
        planned: list[Attached] = []
        keys: set[str] = set()
        for spec in specs:
            cls = TUNERS.get(spec.name)
            if cls.placement not in PLACEMENTS:
                raise PlacementError(f"Tuner {cls.name!r} has unknown placement {cls.placement!r}; known: {list(PLACEMENTS)}")
            cls.check_args(spec.args)
            sites = backbone.match(spec.at)
            for site in sites:
                cls.check_site(site_specs[site])
            shared = cls.shared_state(tuple(site_specs[s] for s in sites), spec.args)
            shared_key = None
            if shared is not None:
                shared_key = spec.key or cls.name
                if f"shared.{shared_key}" in keys or "." in shared_key:
                    raise PlacementError(f"Two specs share the state key {shared_key!r} (or it has a dot); "
                                         f"give each {cls.name!r} spec a distinct 'key'")
                keys.add(f"shared.{shared_key}")
            if PLACEMENTS[cls.placement]:
                for site in sites:
                    key = f"{site}.{cls.name}"
                    if key in keys:
                        raise PlacementError(f"Tuner {cls.name!r} is attached twice at site {site!r}")
                    keys.add(key)
                    slot = backbone.slot(site)
                    if cls.name in slot.tuners:
                        raise PlacementError(f"Site {site!r} already has a {cls.name!r} tuner")
                    cls.check_handle(slot.handle)
                    tuner = cls(site=site_specs[site], **spec.args)
                    if shared is not None:
                        tuner.bind_shared(shared)
                    planned.append(Attached(key, (site,), tuner, slot.handle, shared_key))
            else:
                key = f"side.{spec.key or cls.name}"
                if key in keys:
                    raise PlacementError(f"Two side tuners share the key {key!r}; give each a distinct 'key'")
                keys.add(key)
                tuner = cls(sites=tuple(site_specs[s] for s in sites), **spec.args)
                planned.append(Attached(key, tuple(sites), tuner, None))
        side = [a.key for a in planned if a.handle is None]
        at_head = [a.key for a in planned if a.handle is not None and site_specs[a.sites[0]].kind == "head"]
        if side and at_head:
            raise PlacementError(
                f"Side tuners {side} produce the model's outputs, so tuners at the head {at_head} would never run; "
                "side tuners bring their own heads: drop the head tuners"
            )
        return planned

    # Walking tuners ---------------------------------------------------------------------
    def attached(self) -> list[Attached]:
        return list(self._attached)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        seen: set[int] = set()
        for a in self._attached:
            for name, p in a.trainable().items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield f"{a.key}.{name}", p
        for key, module in self.shared.items():
            for name, p in module.named_parameters():
                yield f"shared.{key}.{name}", p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def num_parameters(self) -> tuple[int, int]:
        """(tunable, total) parameter counts; total counts the frozen model and every tuner once."""
        tunable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        return tunable, total

    # Running ----------------------------------------------------------------------------
    @property
    def side_layers(self) -> list[int]:
        specs = self.backbone.site_specs()
        return sorted({specs[s].layer for a in self._attached if a.handle is None for s in a.sites if specs[s].layer is not None})

    def reads_features_only(self) -> bool:
        """Whether every tuner reads frozen features (side tuners, or tuners at the head), so the
        backbone below the head can run once without gradients and its features be cached."""
        specs = self.backbone.site_specs()
        return all(a.handle is None or specs[a.sites[0]].kind == "head" for a in self._attached)

    def backbone_needs_grad(self) -> bool:
        return any(a.handle is not None for a in self._attached)

    def forward(self, *args: Any, features: Features | None = None, **kwargs: Any) -> Tensor | dict[str, Tensor]:
        """Backbone inputs (``pixel_values=...`` / ``input_ids=...``), or ``features=`` already
        computed (e.g. from the feature cache) for models whose tuners are all side tuners."""
        if features is not None:
            if not self.reads_features_only():
                raise ConfigError("features= skips the backbone, but this model has tuners inside it")
            return self.side_forward(features) if len(self.side) else self.backbone.head(features.pooled)
        if not len(self.side):
            return self.backbone(*args, **kwargs)
        grad = torch.is_grad_enabled() and self.backbone_needs_grad()
        with torch.set_grad_enabled(grad):
            feats = self.backbone.intermediates(*args, layers=self.side_layers, **kwargs)
        return self.side_forward(feats if grad else feats.detach())

    def side_forward(self, feats: Features) -> Tensor | dict[str, Tensor]:
        """Side tuners on given (e.g. cached) features: one tensor, or a dict by key."""
        outs = {key: tuner(feats) for key, tuner in self.side.items()}
        return next(iter(outs.values())) if len(outs) == 1 else outs

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (outputs and gradients unchanged)."""
        self.backbone.set_grad_checkpointing(enable)

    # Merging ----------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold every reparam tuner (LoRA, SSF, BitFit) into its frozen linear layer. All or
        nothing: a tuner class without ``merge`` fails before any weight changes, and if a merge
        fails midway (e.g. no bias to merge into), the ones merged before it are unmerged again."""
        todo = _merge_order([a for a in self._attached if a.tuner.placement == "reparam" and not a.tuner.merged])
        for a in todo:
            if type(a.tuner).merge is Tuner.merge:
                a.tuner.merge(a.handle)  # raises the tuner's "cannot be merged" error
        done: list[Attached] = []
        try:
            for a in todo:
                a.tuner.merge(a.handle)
                a.tuner.merged = True
                done.append(a)
        except Exception:
            for a in reversed(done):
                a.tuner.unmerge(a.handle)
                a.tuner.merged = False
            raise

    def unmerge(self) -> None:
        for a in reversed(_merge_order(self._attached)):
            if a.tuner.placement == "reparam" and a.tuner.merged:
                a.tuner.unmerge(a.handle)
                a.tuner.merged = False

    def save_pretrained(self, folder: str, **kwargs: Any):
        """A self-describing folder of these tuners (``utuning.pretrained.save_pretrained``)."""
        from utuning.pretrained import save_pretrained

        return save_pretrained(self, folder, **kwargs)

    # State ------------------------------------------------------------------------------
    def _states(self) -> dict[str, Tensor]:
        """Every saved tuner tensor by stable key: per site, then state shared across sites."""
        out = {f"{a.key}.{n}": t for a in self._attached for n, t in a.state().items()}
        out.update({f"shared.{k}.{n}": t for k, m in self.shared.items() for n, t in m.state_dict(keep_vars=True).items()})
        return out

    def tuner_state_dict(self) -> dict[str, Tensor]:
        """Tuner weights only, with stable keys ``{site}.{tuner}.{param}`` (``shared.{key}.{name}``
        for state shared across sites)."""
        return {k: t.detach().clone() for k, t in self._states().items()}

    def load_tuner_state_dict(self, state: Mapping[str, Tensor], strict: bool = True) -> None:
        """Copy tuner weights in; with ``strict`` any missing, unexpected or mis-shaped entry fails
        (all are listed) before anything is copied."""
        if any(a.tuner.merged for a in self._attached):
            raise StateDictError("Unmerge the tuners before loading tuner weights (model.unmerge())")
        targets = self._states()
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets))
        shapes = sorted(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(targets[k].shape)}"
            for k in set(targets) & set(state)
            if tuple(state[k].shape) != tuple(targets[k].shape)
        )
        if shapes or (strict and (missing or unexpected)):
            parts = []
            if missing:
                parts.append(f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
            if unexpected:
                parts.append(f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
            if shapes:
                parts.append(f"mis-shaped {shapes[:10]}")
            raise StateDictError("Tuner state dict does not fit this model: " + "; ".join(parts))
        with torch.no_grad():
            for k, t in targets.items():
                if k in state:
                    t.copy_(state[k])

    def tuner_config(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.specs]

    # Reporting --------------------------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        """Rows per (site, tuner): parameters and their share of all model parameters."""
        _, total = self.num_parameters()
        rows = []
        for a in self._attached:
            n = sum(p.numel() for p in a.trainable().values())
            rows.append(
                {
                    "site": a.sites[0] if len(a.sites) == 1 else f"{a.sites[0]} .. {a.sites[-1]} ({len(a.sites)})",
                    "tuner": a.tuner.name,
                    "placement": a.tuner.placement,
                    "parameters": n,
                    "share": n / total if total else 0.0,
                }
            )
        for key, module in self.shared.items():
            sites = [s for a in self._attached if a.shared_key == key for s in a.sites]
            n = sum(p.numel() for p in module.parameters())
            rows.append({"site": f"shared.{key} ({len(sites)} sites)", "tuner": key, "placement": "shared",
                         "parameters": n, "share": n / total if total else 0.0})
        return rows

    def format_summary(self) -> str:
        rows = self.summary()
        tunable, total = self.num_parameters()
        w = max([len(r["site"]) for r in rows] + [4])
        t = max([len(r["tuner"]) for r in rows] + [5])
        lines = [f"{'site':<{w}}  {'tuner':<{t}}  {'placement':<10}  {'parameters':>12}  {'share':>8}"]
        for r in rows:
            lines.append(f"{r['site']:<{w}}  {r['tuner']:<{t}}  {r['placement']:<10}  {r['parameters']:>12,}  {r['share']:>8.4%}")
        lines.append(f"tunable {tunable:,} of {total:,} parameters ({tunable / max(total, 1):.4%}, {_millions(tunable)})")
        return "\n".join(lines)


def _merge_order(attached: list[Attached]) -> list[Attached]:
    """The order reparam tuners fold into their layers so that the merged layer computes what the
    unmerged one did: tuners that transform the layer's input (``Tuner.transforms_input``) first,
    the one applied last (nearest the layer) first; then the others in attach order, which is the
    order they act on the layer's output and which reads the original input."""
    return [a for a in reversed(attached) if a.tuner.transforms_input] + [a for a in attached if not a.tuner.transforms_input]


def _millions(n: int) -> str:
    return f"{math.floor(n / 1e4 + 0.5) / 100:.2f}M"


def tune(model: Backbone | nn.Module, tuners: Sequence[Any] = (), *,
         data: Mapping[str, Any] | None = None, backbone: str | None = None, **backbone_args: Any) -> TunedModel:
    """Attach ``tuners`` (specs, dicts or ``(name, at[, args])`` tuples) to ``model``.

    ``data``: what the data knows of its labels, ``{"num_classes": int, "label_names": list | None}``;
    arguments a tuner declares in ``from_data`` default to it, and a recipe value that contradicts
    it is a ``ConfigError`` (``Tuner.args_from_data``).

    ``backbone``: the adapter to wrap a plain model with (``"generic"`` for any model, with
    ``example_inputs=...``; see ``utuning.wrap``), and ``backbone_args`` its arguments."""
    if data is not None:
        specs = expand_specs(tuners)
        tuners = [TunerSpec(s.name, s.at, {**s.args, **TUNERS.get(s.name).args_from_data(s.args, data)}, s.key)
                  for s in specs]
    if backbone is not None or backbone_args:
        model = wrap(model, backbone, **backbone_args)
    return TunedModel(model, tuners)
