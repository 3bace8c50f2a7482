"""A self-describing folder for a tuned model, loadable without the recipe that trained it.

    model.save_pretrained("my-tuners", create={"model": "vit_base_patch16_224.orig_in21k"})
    model = utuning.from_pretrained("my-tuners")                   # rebuilds the backbone from the folder
    model = utuning.from_pretrained("my-tuners", backbone=my_vit)  # or onto a model you built

The folder holds ``utuning.json`` (format, the backbone adapter's registered name and the
keyword arguments that rebuild it with ``build_backbone``, the model's own ``tuner_config()``,
the data description, plugin imports), ``tuner.safetensors`` (every tuner weight, the head's
included) and ``checksums.json`` (verified on load; a damaged file is an error naming it). For
the HF PEFT format see ``utuning.peft_format``; for merged weights ``utuning export``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from utuning import plugins
from utuning.backbone import build_backbone, wrap
from utuning.errors import ConfigError, StateDictError
from utuning.files import atomic_text, verify, write_checksums
from utuning.model import TunedModel, tune, unwrap

CONFIG = "utuning.json"
WEIGHTS = "tuner.safetensors"
FORMAT = "utuning-pretrained/1"


def save_pretrained(model: nn.Module, folder: str | Path, *, create: Mapping[str, Any] | None = None,
                    data: Mapping[str, Any] | None = None, imports: list[str] | None = None) -> Path:
    """Write ``model``'s tuners as a self-describing folder (replaced atomically as a whole).

    ``create``: keyword arguments of the backbone adapter's ``create`` that rebuild the frozen model
    (e.g. ``{"model": "vit_base_patch16_224.orig_in21k", "pretrained": True, "num_classes": 100}``);
    without it, ``from_pretrained`` needs ``backbone=``. ``data``: the data description the tuners
    were built with (classes, label names); ``imports``: plugins the tuners need."""
    tuned = unwrap(model)
    if any(a.tuner.merged for a in tuned.attached()):
        raise StateDictError("Unmerge the tuners before saving them (model.unmerge())")
    folder = Path(folder)
    config = {"format": FORMAT, "backbone": {"name": type(tuned.backbone).name, "create": dict(create or {})},
              "tuners": tuned.tuner_config(), "data": dict(data or {}), "imports": list(imports or [])}
    try:
        json.dumps(config)
    except TypeError as e:
        raise ConfigError(f"save_pretrained: the config must be JSON data ({e})") from None
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().cpu() for k, v in tuned.tuner_state_dict().items()}, str(tmp / WEIGHTS),
              metadata={"format": FORMAT})
    atomic_text(tmp / CONFIG, json.dumps(config, indent=2))
    write_checksums(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ConfigError(f"{folder} is not a utuning pretrained folder: no {CONFIG}"
                          + (" (it is a PEFT adapter: use utuning.peft_format.load_peft)"
                             if (folder / "adapter_config.json").is_file() else ""))
    verify(folder)
    config = json.loads((folder / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{folder / CONFIG}: format {config.get('format')!r} is not {FORMAT!r}")
    return config


def from_pretrained(folder: str | Path, *, backbone: nn.Module | None = None, **create: Any) -> TunedModel:
    """The ``TunedModel`` saved in ``folder``: onto ``backbone`` when given (any model its adapter
    wraps), else rebuilt with ``build_backbone(name, **saved_create, **create)``. Outputs equal the
    saved model's on the same frozen weights; in eval mode."""
    folder = Path(folder)
    config = read_config(folder)
    plugins.load_all(config["imports"], where=f"{folder / CONFIG}: imports")
    if backbone is None:
        kwargs = {**config["backbone"]["create"], **create}
        if not kwargs:
            raise ConfigError(f"{folder} does not say how to build its backbone ({config['backbone']['name']!r}); "
                              "pass backbone=<the frozen model> or its create() arguments")
        backbone = build_backbone(config["backbone"]["name"], **kwargs)
    model = tune(wrap(backbone), config["tuners"])
    model.load_tuner_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval()


def run_to_pretrained(checkpoint: str | Path, folder: str | Path) -> Path:
    """A trained run (or one checkpoint) as a pretrained folder, with the recipe's backbone arguments."""
    from utuning.build import backbone_kwargs
    from utuning.checkpoint import load_tuned, read_checkpoint

    meta = read_checkpoint(checkpoint)[1]
    recipe = meta["recipe"]
    create = backbone_kwargs(recipe, num_classes=meta.get("num_classes"))
    return save_pretrained(load_tuned(checkpoint), folder, create=create, data=meta.get("data"),
                           imports=list(recipe.imports))
