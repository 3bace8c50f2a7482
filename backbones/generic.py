"""The generic adapter: any PyTorch model, with its own module paths as sites.

For a model no family adapter knows (a user's ``nn.Module``, a torchvision ResNet, an
``nn.TransformerEncoder``), ``GenericBackbone`` cannot re-write the blocks' forwards, so it
exposes what it can see from outside (U-Tuning's ``x' = OP(x) + U(x)``, arXiv 2303.00690, with
``OP`` a submodule):

==========================  ==============  ===============================================
module (by type)            site kind       placements
==========================  ==============  ===============================================
``nn.Linear``               linear          reparam (LoRA, BitFit, SSF, IA3...), unfreeze
``nn.Conv1d/2d/3d``         conv            reparam (``conv_lora``), unfreeze
``nn.MultiheadAttention``   attn (+ linear  prefix, parallel, sequential, unfreeze; q/k/v and
                            in_proj, out)   out_proj reparam (``torch_mha.py``)
``nn.Embedding``            embed           reparam (``embedding_lora``), unfreeze
norms (LayerNorm, BN...)    norm            unfreeze
any other module with       block           parallel, sequential (single-tensor input and
parameters                                  output, widths from a dry run), side, unfreeze
==========================  ==============  ===============================================

Site names are module paths (``layer1.0.conv1``, ``encoder.layers.3.self_attn``), selected with
the usual glob patterns. Prompt and prefix tuning need to know where a module's attention is,
so only ``nn.MultiheadAttention`` sites take prefixes and no site takes prompts.

**Example inputs.** Widths of a block's input and output, and which blocks take a single tensor
and return one, are read from one dry run on ``example_inputs`` (eval mode, no gradients, so
batch-norm statistics do not move). Without them, only module-typed sites (linear, conv,
attention, norms) are offered. **Layouts**: 2-D tensors are (B, D) features, 3-D ones (B, N, D)
tokens (``sequence_first=True`` for (N, B, D) models: side tuners then read them transposed),
4-D and 5-D ones channel-first maps (B, C, H, W): a parallel or sequential tuner reads them as
tokens (B, H·W, C), and on a block that shrinks the map (a stride-2 residual block) a parallel
tuner reads its input average-pooled to the output's size.

**Mechanism** (``generic_sites.py``): a site module is replaced in its parent by a
``SiteModule`` that shares the module's own parameter, buffer and child tables, so the frozen
state (keys, tensors, flags) is exactly the original's; no class is swapped, no forward replaced,
no hook left behind. ``nn.MultiheadAttention`` is re-written by ``TunedMultiheadAttention``
(``torch_mha.py``). Because PyTorch's fused inference path of ``nn.TransformerEncoderLayer``
would skip the slots, the adapter runs the model with the ``torch.backends.mha`` fast path off.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from utuning.backbone import Backbone, Features, refuse
from utuning.backbones.generic_sites import (
    CONTAINERS,
    ModuleHandle,
    Recorder,
    SiteContainer,
    SiteModule,
    feature_width,
    fused_attention_off,
)
from utuning.backbones.torch_mha import add_attention_sites
from utuning.errors import ConfigError, UnknownNameError, UnsupportedModelError, closest
from utuning.handle import LinearHandle, OpHandle
from utuning.registry import register_backbone
from utuning.sites import SiteSpec

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm, nn.LocalResponseNorm)
NOT_ATTENTION = ("the generic adapter does not know where this module's attention is; prompt and prefix "
                 "tuning need a backbone adapter for the model (or an nn.MultiheadAttention site)")
NO_EXAMPLE = ("the widths of a module's input and output come from a dry run: wrap with "
              "example_inputs=... (a tensor, a tuple of arguments or a dict of keyword arguments)")


def _call_shape(args: tuple, kwargs: dict, out: Any) -> dict[str, Any] | str:
    """What one call of a module looked like, or why tuners cannot read and add to it."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return "its first input is not a floating-point tensor" if x is not None else "it takes no positional input"
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return f"it returns a {type(out).__name__}, not one floating-point tensor"
    if x.dim() < 2 or out.dim() < 2 or (x.dim() >= 4) != (out.dim() >= 4) or x.shape[0] != out.shape[0]:
        return f"it maps {tuple(x.shape)} to {tuple(out.shape)}: not the same batch of features, tokens or maps"
    if x.dim() == 3 and x.shape[:2] != out.shape[:2]:
        return f"it maps {tuple(x.shape)} tokens to {tuple(out.shape)}: a different number of tokens"
    return {"dim": feature_width(x), "out_dim": feature_width(out), "layout": "map" if x.dim() >= 4 else "tokens",
            "in_shape": tuple(x.shape), "out_shape": tuple(out.shape)}


def dry_run(model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, dict | str], list[str]]:
    """Call shapes per module path (a reason string where tuners cannot sit beside it) and the
    order in which the modules returned, from one forward in eval mode without gradients. The
    temporary hooks record shapes only, and are removed before returning."""
    calls: dict[str, dict | str] = {}
    order: list[str] = []
    modes = {m: m.training for m in model.modules()}

    def record(path: str):
        def hook(module: nn.Module, a: tuple, kw: dict, out: Any) -> None:
            shape, seen = _call_shape(a, kw, out), calls.get(path)
            if seen is None:
                calls[path] = shape
                order.append(path)
            elif isinstance(seen, dict) and shape != seen:  # a later call that differs: no single width
                calls[path] = shape if isinstance(shape, str) else \
                    f"it is called with different shapes ({seen['in_shape']} and {shape['in_shape']})"
        return hook

    handles = [m.register_forward_hook(record(p), with_kwargs=True) for p, m in model.named_modules() if p]
    try:
        model.eval()
        with torch.no_grad(), fused_attention_off():
            model(*args, **kwargs)
    except Exception as e:  # the user's model failing on the user's inputs: say so, with the cause
        raise ConfigError(f"The dry run of {type(model).__name__} on example_inputs failed: {e}") from e
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return calls, order


def _positional(kwargs: dict, key: str, args: tuple = ()) -> tuple[tuple, dict]:
    """``batch[key]`` as the model's first positional argument (data loaders name their inputs)."""
    rest = dict(kwargs)
    return (rest.pop(key), *args), rest


def _as_call(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ConfigError(f"example_inputs must be a tensor, a tuple of arguments or a dict of keyword arguments, "
                      f"not a {type(example_inputs).__name__}")


def _import_callable(path: str) -> Any:
    """``"package.module.function"`` or ``"package.module:function"``."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        found = importlib.import_module(module_name)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"backbone.model={path!r} is not an importable callable "
                          f"('package.module.function' or 'package.module:function'): {e}") from e
    build = getattr(found, attr, None)
    if not callable(build):
        names = [n for n in dir(found) if not n.startswith("_")]
        raise UnknownNameError(f"{module_name} has no callable {attr!r}. Did you mean {closest(attr, names)}?")
    return build


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embed"
    if isinstance(module, NORMS):
        return "norm"
    return "block"


def _norm_width(module: nn.Module) -> int:
    for attr in ("normalized_shape", "num_features", "num_channels", "size"):
        value = getattr(module, attr, None)
        if value is not None:
            return int(value[-1]) if isinstance(value, (tuple, list, torch.Size)) else int(value)
    return 0


@register_backbone("generic")
class GenericBackbone(Backbone):
    """Any ``nn.Module``: sites are its module paths (see the module docstring).

    ``example_inputs``: a tensor, a tuple of positional arguments or a dict of keyword arguments
    for one forward (dry run of block widths; parallel, sequential and side tuners need it).
    ``sequence_first``: 3-D tensors are (N, B, D) (side tuners read them as (B, N, D))."""

    fallback = True

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Any model with at least one submodule holding parameters (a site)."""
        return isinstance(model, nn.Module) and any(p and any(True for _ in m.parameters())
                                                    for p, m in model.named_modules())

    @classmethod
    def create(cls, *, model: str, pretrained: bool | str = False, num_classes: int | None = None,
               img_size: int | None = None, input_shape: Sequence[int] | None = None, input_dtype: str = "float32",
               input_key: str = "pixel_values", sequence_first: bool = False, **model_kwargs: Any) -> GenericBackbone:
        """Build ``model``, an importable callable (``"torchvision.models.resnet18"`` or
        ``"package.module:function"``), with ``model_kwargs`` (and ``num_classes``), and wrap it.
        ``pretrained``: False or a local state-dict file. The dry run uses random inputs of shape
        ``(2, *input_shape)`` (default ``(2, 3, img_size, img_size)``; ``input_dtype: int64`` for
        token ids, drawn from 0 and 1). Batches call the model with ``batch[input_key]`` as its input."""
        if pretrained is True:
            raise ConfigError("The generic adapter loads weights from a local file (pretrained: path/to/weights.pt), "
                              "or through the model's own arguments (backbone.args)")
        if input_shape is None and img_size is None:
            raise ConfigError("The generic adapter needs backbone.args.input_shape (one sample's shape) or img_size")
        if input_dtype not in ("float32", "int64"):
            raise ConfigError(f"input_dtype={input_dtype!r} is not one of ['float32', 'int64']")
        net = _import_callable(model)(**model_kwargs, **({} if num_classes is None else {"num_classes": num_classes}))
        if pretrained:
            net.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
        shape = (2, *(input_shape or (3, img_size, img_size)))
        sample = torch.randn(shape) if input_dtype == "float32" else torch.randint(0, 2, shape)
        return cls(net, example_inputs={input_key: sample}, sequence_first=sequence_first, input_key=input_key)

    def __init__(self, model: nn.Module, *, example_inputs: Any = None, sequence_first: bool = False,
                 input_key: str | None = None) -> None:
        if isinstance(model, Backbone):
            raise refuse(f"A {type(model).__name__}", "it is already a backbone adapter; pass its model")
        if isinstance(model, nn.MultiheadAttention):
            raise refuse("A bare nn.MultiheadAttention", "wrap a module that holds it: its sites are then "
                         "'<name>', '<name>.in_proj' and '<name>.out_proj'")
        if not self.accepts(model):
            raise refuse(f"A {type(model).__name__} without submodules", "the generic adapter's sites are submodules")
        if example_inputs is None:
            call = None
        elif input_key is not None and isinstance(example_inputs, Mapping):
            call = _positional(dict(example_inputs), input_key)
        else:
            call = _as_call(model, example_inputs)
        calls, order = dry_run(model, *call) if call is not None else ({}, [])
        occurrences = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
                       if child is not None]
        super().__init__(model)  # all checks and the dry run are done: from here on the model changes
        self._call = call
        self.input_key = input_key
        self.recorder = Recorder(sequence_first=sequence_first)
        replace: dict[int, nn.Module] = {}
        inside_attention: list[str] = []
        blocks = [p for p in order if isinstance(calls[p], dict) and _kind(m := model.get_submodule(p)) == "block"
                  and any(True for _ in m.parameters())]  # side layers: blocks in the order they returned
        for path, module in model.named_modules():
            if not path or any(path.startswith(a + ".") for a in inside_attention):
                continue
            if not any(True for _ in module.parameters()):
                continue
            if isinstance(module, nn.MultiheadAttention):
                inside_attention.append(path)
                replace[id(module)] = add_attention_sites(self, path, module)
                continue
            layer = blocks.index(path) if path in blocks else None
            spec, handle = self._site(path, module, calls.get(path), layer, call is not None)
            slot = self.add_site(spec, handle)
            if spec.placements - {"unfreeze"}:
                cls = SiteContainer if isinstance(module, CONTAINERS) else SiteModule
                replace[id(module)] = cls(module, slot, self.recorder, layer)
        for parent, name, child in occurrences:
            if id(child) in replace:
                parent._modules[name] = replace[id(child)]

    def _site(self, path: str, module: nn.Module, call: dict | str | None, layer: int | None,
              ran: bool) -> tuple[SiteSpec, OpHandle]:
        kind = _kind(module)
        refused = {"prompt": NOT_ATTENTION, "prefix": NOT_ATTENTION}
        if ran and call is None and kind in ("linear", "conv", "embed"):
            # e.g. the out_proj of an nn.MultiheadAttention called by its parent: the parent reads
            # the weights directly, so a reparam tuner on this module would never run.
            refused["reparam"] = "the dry run never called this module (its parent may read its weights directly)"
            return SiteSpec(path, kind, 0, frozenset({"unfreeze"}), refused=refused), ModuleHandle(path, module)
        if kind == "linear":
            spec = SiteSpec(path, "linear", module.in_features, frozenset({"reparam", "unfreeze"}),
                            out_dim=module.out_features, refused=refused, info={"split": 1})
            return spec, LinearHandle(path, module)
        if kind == "conv":
            info = {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation", "groups",
                                                    "padding_mode")}
            spec = SiteSpec(path, "conv", module.in_channels, frozenset({"reparam", "unfreeze"}),
                            out_dim=module.out_channels, refused=refused, info=info)
            return spec, ModuleHandle(path, module)
        if kind == "embed":
            info = {k: getattr(module, k) for k in ("num_embeddings", "padding_idx", "max_norm")}
            spec = SiteSpec(path, "embed", module.embedding_dim, frozenset({"reparam", "unfreeze"}), refused=refused,
                            info=info)
            return spec, ModuleHandle(path, module)
        if kind == "norm":
            return SiteSpec(path, kind, _norm_width(module), frozenset({"unfreeze"}), refused=refused), \
                ModuleHandle(path, module)
        if isinstance(call, dict):
            spec = SiteSpec(path, "block", call["dim"], frozenset({"parallel", "sequential", "unfreeze"}),
                            out_dim=call["out_dim"], layer=layer, refused=refused, info=dict(call))
            return spec, ModuleHandle(path, module)
        why = NO_EXAMPLE if not ran else ("the dry run never called it" if call is None else call)
        refused.update({"parallel": why, "sequential": why, "side": why})
        width = next((p.shape[-1] for p in module.parameters()), 0)
        return SiteSpec(path, "block", width, frozenset({"unfreeze"}), refused=refused), ModuleHandle(path, module)

    # Running ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.input_key is not None and self.input_key in kwargs:
            args, kwargs = _positional(kwargs, self.input_key, args)
        with fused_attention_off():
            return self.model(*args, **kwargs)

    def intermediates(self, *args: Any, layers: list[int], **kwargs: Any) -> Features:
        """Outputs of the block sites with these ``layer`` indices (the order in which blocks
        returned in the dry run), as tokens (B, N, D); ``final`` is the deepest one and ``pooled``
        its mean over tokens (B, D)."""
        if not layers:
            raise ConfigError("The generic adapter's features are the outputs of chosen block sites: give layers")
        known = {s.layer for s in self.site_specs().values() if s.layer is not None}
        missing = sorted(set(layers) - known)
        if missing:
            raise ConfigError(f"No block site has layer {missing}; block layers are {sorted(known)}")
        self.recorder.layers, self.recorder.found = frozenset(layers), {}
        try:
            self.forward(*args, **kwargs)
            found = dict(self.recorder.found)
        finally:
            self.recorder.layers, self.recorder.found = None, {}
        absent = sorted(set(layers) - set(found))
        if absent:
            raise ConfigError(f"The forward did not run the block sites of layers {absent} (it did in the dry run)")
        final = found[max(layers)]
        return Features(found, final, final.mean(1), None, {"prefix_tokens": 0})

    def feature_options(self) -> dict[str, Any]:
        return {"sequence_first": self.recorder.sequence_first, "input_key": self.input_key}

    def head(self, pooled: Tensor) -> Tensor:
        raise UnsupportedModelError("The generic adapter has no head site: the model's own modules make its outputs")

    def example_inputs(self, batch_size: int = 2) -> dict[str, Tensor]:
        """The ``example_inputs`` given when wrapping, by keyword (their own batch size)."""
        if self._call is None:
            raise ConfigError("This generic backbone was wrapped without example_inputs")
        args, kwargs = self._call
        if self.input_key is not None:
            return {self.input_key: args[0], **kwargs}
        return dict(inspect.signature(self.model.forward).bind(*args, **kwargs).arguments)
