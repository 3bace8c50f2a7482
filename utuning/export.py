"""Merged backbone weights in the format the model family's own library loads (``utuning export``).

``utuning.checkpoint.export_backbone`` folds a checkpoint's mergeable tuners into the frozen
weights and hands the merged state dict to the backbone adapter's ``export_native``. What it
writes is the adapter's choice, declared by ``Backbone.native_export``:

* ``"file"`` (the default: timm and other state-dict models): ``--out`` is one safetensors file
  of the original model's state dict; an existing file is replaced, a folder is refused.
* ``"folder"`` (Hugging Face adapters): ``--out`` is a folder that ``from_pretrained`` loads
  (``config.json`` + ``model.safetensors``, the tokenizer where the backbone has one). It must be
  new or empty: export never deletes files, so a folder with files in it is refused.

Either is written under a temporary sibling name and renamed into place, so a failed export
leaves nothing behind. This module holds the parts that know no family: the ``--out`` checks,
the atomic writes and the folding of a trained linear head into the model's own head.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from utuning.errors import ConfigError, UnsupportedModelError
from utuning.files import atomic_folder, atomic_write

KINDS = ("file", "folder")


@dataclass
class BackboneExport:
    """What ``export_backbone`` wrote: the path, its kind, the head tuners written into the model's
    own head, those left out (key -> why; their weights stay in the checkpoint) and the adapter's notes."""

    path: Path
    kind: str
    folded_heads: list[str] = field(default_factory=list)
    left_heads: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"wrote {self.path}" + (" (a from_pretrained folder)" if self.kind == "folder" else "")]
        lines += [f"  {note}" for note in self.notes]
        if self.folded_heads:
            lines.append(f"  head tuners written into the model's own head: {self.folded_heads}")
        for key, why in self.left_heads.items():
            lines.append(f"  head tuner {key} is not in it ({why}); its weights stay in the checkpoint's "
                         "tuner.safetensors")
        return "\n".join(lines)


def check_target(out: str | Path, kind: str, backbone: str) -> Path:
    """``out`` as a path that ``kind`` (``Backbone.native_export``) can be written to, or a
    ``ConfigError`` saying why not (a folder for a file, a file or a non-empty folder for a folder)."""
    text, path = str(out), Path(out).expanduser().absolute()  # absolute: ``--out .`` has a name and a parent
    if kind == "file":
        if path.is_dir() or text.endswith(("/", os.sep)):
            raise ConfigError(f"--out {text!r} is a folder, but the {backbone!r} backbone exports one safetensors file "
                              f"(its model's state dict): give a file path such as {str(path / 'model.safetensors')!r}")
    elif kind == "folder":
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {text!r} is a file, but the {backbone!r} backbone exports a folder that "
                              "from_pretrained loads (config.json + model.safetensors): give a new or empty folder")
        if path.suffix == ".safetensors":
            raise ConfigError(f"--out {text!r} names a file, but the {backbone!r} backbone exports a folder that "
                              f"from_pretrained loads: give a folder such as {str(path.with_suffix(''))!r}")
        if path.is_dir() and any(path.iterdir()):
            raise ConfigError(f"--out {text!r} is a folder with files in it; export never deletes files: give a new "
                              "or empty folder (or remove that one)")
    else:
        raise UnsupportedModelError(f"The {backbone!r} backbone adapter declares native_export={kind!r}, which is not "
                                    f"one of {list(KINDS)}")
    return path


def write_atomically(path: Path, kind: str, write: Callable[[Path], Any]) -> Any:
    """``write(tmp)`` fills a temporary sibling of ``path`` (a file, or an empty folder), which is
    then synced and renamed to ``path``; on any error the temporary is removed and ``path`` untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        returned: list[Any] = []
        atomic_write(path, lambda tmp: returned.append(write(tmp)))
        return returned[0]
    return atomic_folder(path, write)  # ``check_target`` made sure ``path`` is absent or an empty folder


def fold_heads(model: Any, keys: list[str], tensors: dict[str, Tensor]) -> tuple[list[str], dict[str, str]]:
    """Write the head tuners ``keys`` of ``model`` (a ``TunedModel``) into the model's own head in
    ``tensors`` (its merged ``frozen_state_dict``) where that is exact; returns (folded keys, {key: why not}).

    A head tuner folds when the frozen head operation is one linear layer (the backbone's head
    handle holds one ``nn.Linear``, the layer ``linear_probe`` also copies at attach) and the tuner
    is exactly one linear layer of its shape: its only parameters are one ``nn.Linear``'s, and its
    output on a probe batch is that layer's. A head whose weight is tied to another layer (a
    language model's output embedding) never folds, since writing it would change that layer too."""
    frozen = model.backbone.model
    paths = {id(m): name for name, m in frozen.named_modules()}
    uses: dict[int, int] = {}
    for _, p in frozen.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    attached = {a.key: a for a in model.attached()}
    folded, left = [], {}
    for key in keys:
        a = attached[key]
        found = _as_linear(a, paths, uses, tensors)
        if isinstance(found, str):
            left[key] = found
            continue
        name, fc = found
        with torch.no_grad():
            tensors[f"{name}.weight"] = fc.weight.detach().to("cpu", tensors[f"{name}.weight"].dtype).contiguous()
            if f"{name}.bias" in tensors:
                bias = fc.bias.detach() if fc.bias is not None else torch.zeros(fc.out_features)
                tensors[f"{name}.bias"] = bias.to("cpu", tensors[f"{name}.bias"].dtype).contiguous()
        folded.append(key)
    return folded, left


def _as_linear(a: Any, paths: Mapping[int, str], uses: Mapping[int, int],
               tensors: Mapping[str, Tensor]) -> tuple[str, nn.Linear] | str:
    """(the head layer's module path, the tuner's linear layer), or why the tuner does not fold."""
    heads = {k: m for k, m in a.handle.modules.items() if m is not None}
    if len(heads) != 1 or not isinstance(next(iter(heads.values())), nn.Linear):
        return f"the frozen head is {sorted(heads)}, not one linear layer"
    head: nn.Linear = next(iter(heads.values()))
    linears = [m for m in a.tuner.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1 or {id(p) for p in a.tuner.parameters()} != {id(p) for p in linears[0].parameters()}:
        return "the tuner is not one linear layer"
    fc = linears[0]
    if fc.weight.shape != head.weight.shape:
        return f"its weight is {tuple(fc.weight.shape)}, the model's head {tuple(head.weight.shape)}"
    if head.bias is None and fc.bias is not None and bool(fc.bias.detach().any()):
        return "the model's head has no bias and the tuner's bias is not zero"
    if uses.get(id(head.weight), 0) > 1:
        return "the model's head weight is tied to another layer"
    name = paths.get(id(head))
    if name is None or f"{name}.weight" not in tensors:
        return "the model's head is not in the backbone's state dict"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, fc.in_features, generator=g).to(fc.weight)  # (2, D) probe batch
    with torch.no_grad():
        same = torch.allclose(a.tuner(x, a.handle), nn.functional.linear(x, fc.weight, fc.bias))
    return (name, fc) if same else "its output is not its linear layer's"
