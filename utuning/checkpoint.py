"""Checkpoints: tuner weights only, the resolved recipe beside them, and resume state apart.

A checkpoint is a folder ``<out>/checkpoints/step_{N:08d}/``::

    tuner.safetensors   TunedModel.tuner_state_dict() (the head's linear_probe included); its
                        metadata holds the resolved recipe as a JSON string ("recipe"), the
                        tuner specs ("tuners"), "num_classes", "step" and the utuning version
    recipe.yaml         the same resolved recipe, for people
    train_state.pt      optimizer, scheduler, step/epoch/batch counters, raw (non-EMA) tuner
                        weights and EMA shadow (torch.save; only for ``--resume``)
    rng_{rank}.pt       each process's RNG states (python, numpy, torch, cuda)

Every file is written to a temporary name and moved in place with ``os.replace``; the folder
itself is assembled under a temporary name and renamed, and only then is the ``last`` pointer
(a one-line text file naming the folder) replaced. A run killed at any moment therefore leaves
either the previous complete checkpoint or the new complete one, never a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from utuning.errors import ConfigError, StateDictError, closest
from utuning.model import TunedModel, expand_specs
from utuning.schema import Recipe

TUNER_FILE = "tuner.safetensors"
RECIPE_FILE = "recipe.yaml"
STATE_FILE = "train_state.pt"
LAST = "last"
BEST = "best"


# Recipes as data ----------------------------------------------------------------------------
def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def recipe_from_dict(data: Mapping[str, Any], cls: type = Recipe, where: str = "recipe") -> Any:
    """Rebuild a (nested) recipe dataclass from plain data; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where} has unknown key {key!r}; did you mean {closest(key, fields)}?")
        kind = _dataclass_of(hints[key])
        if kind is not None and isinstance(value, Mapping):
            value = recipe_from_dict(value, kind, f"{where}.{key}")
        elif key == "tuners" and cls is Recipe:
            from utuning.schema import TunerConfig

            value = [recipe_from_dict(v, TunerConfig, f"{where}.tuners[{i}]") for i, v in enumerate(value)]
        kwargs[key] = value
    return cls(**kwargs)


def _dataclass_of(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None


def recipe_yaml(recipe: Recipe) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(recipe_to_dict(recipe)))


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe: ``utuning.config.save_resolved`` when available, else YAML of the dataclass."""
    path = Path(path)
    try:
        from utuning.config import save_resolved
    except ImportError:
        save_resolved = None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if save_resolved is not None:
        save_resolved(recipe, tmp)
    else:
        tmp.write_text(recipe_yaml(recipe))
    os.replace(tmp, path)


# Atomic writing ------------------------------------------------------------------------------
def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_pointer(folder: Path, name: str, target: str) -> None:
    _atomic(folder / name, lambda p: p.write_text(target + "\n"))


def read_pointer(folder: Path, name: str = LAST) -> Path | None:
    pointer = Path(folder) / name
    if not pointer.is_file():
        return None
    target = Path(folder) / pointer.read_text().strip()
    return target if (target / TUNER_FILE).is_file() else None


def save_checkpoint(
    folder: str | Path,
    *,
    step: int,
    tuner_state: Mapping[str, Tensor],
    recipe: Recipe,
    num_classes: int | None,
    train_state: Mapping[str, Any] | None = None,
    rng_states: list[Any] | None = None,
    best: bool = False,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step_{step}`` under ``folder`` atomically (with one RNG file per process
    from ``rng_states``), point ``last`` (and ``best``) at it, and remove older checkpoints beyond
    the newest ``keep`` (the best one is kept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = folder / name
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {
        "recipe": json.dumps(recipe_to_dict(recipe)),
        "tuners": json.dumps([s.to_dict() for s in expand_specs(_tuner_dicts(recipe))]),
        "backbone": json.dumps({"name": recipe.backbone.name, "model": recipe.backbone.model}),
        "num_classes": json.dumps(num_classes),
        "step": str(step),
        "format": "utuning-tuner/1",
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tuner_state.items()}
    save_file(tensors, str(tmp / TUNER_FILE), metadata=meta)
    (tmp / RECIPE_FILE).write_text(recipe_yaml(recipe))
    if train_state is not None:
        torch.save(dict(train_state), tmp / STATE_FILE)
    for rank, rng in enumerate(rng_states or []):
        torch.save(rng, tmp / f"rng_{rank}.pt")
    if final.exists():  # a re-run of the same step (after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_pointer(folder, LAST, name)
    if best:
        write_pointer(folder, BEST, name)
    _prune(folder, keep)
    return final


def load_rng(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    path = Path(checkpoint) / f"rng_{rank}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None


def _prune(folder: Path, keep: int) -> None:
    protected = {p.name for p in (read_pointer(folder, LAST), read_pointer(folder, BEST)) if p is not None}
    steps = sorted(p for p in folder.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def _tuner_dicts(recipe: Recipe) -> list[dict[str, Any]]:
    out = []
    for t in recipe.tuners:
        d = {"name": t.name, "at": t.at if isinstance(t.at, str) else list(t.at), "args": dict(t.args)}
        if t.key is not None:
            d["key"] = t.key
        out.append(d)
    return out


# Reading -------------------------------------------------------------------------------------
def resolve(checkpoint: str | Path) -> Path:
    """A checkpoint folder from: the folder, its ``tuner.safetensors``, a ``last``/``best`` pointer,
    the checkpoints folder or the run folder (the last checkpoint)."""
    path = Path(checkpoint).expanduser()
    if path.is_file() and path.name == TUNER_FILE:
        return path.parent
    if (path / TUNER_FILE).is_file():
        return path
    if path.is_file() and path.name in (LAST, BEST) and read_pointer(path.parent, path.name) is not None:
        return read_pointer(path.parent, path.name)
    for folder in (path, path / "checkpoints"):
        found = read_pointer(folder)
        if found is not None:
            return found
    raise ConfigError(f"No checkpoint at {str(path)!r}: expected a folder with {TUNER_FILE}, or a run folder with checkpoints/last")


def read_checkpoint(checkpoint: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tuner weights, metadata with "recipe" as a ``Recipe``, "tuners", "backbone", "num_classes", "step")."""
    folder = resolve(checkpoint)
    with safe_open(str(folder / TUNER_FILE), framework="pt") as f:
        raw = f.metadata() or {}
    if "recipe" not in raw:
        raise StateDictError(f"{folder / TUNER_FILE} holds no recipe metadata; it was not written by utuning")
    meta: dict[str, Any] = {k: json.loads(raw[k]) for k in ("tuners", "backbone", "num_classes") if k in raw}
    meta["recipe"] = recipe_from_dict(json.loads(raw["recipe"]))
    meta["step"] = int(raw.get("step", 0))
    meta["folder"] = folder
    return load_file(str(folder / TUNER_FILE)), meta


def check_compatible(recipe: Recipe, meta: Mapping[str, Any], where: str) -> None:
    """Fail, naming what differs, when ``recipe`` builds a different model than the checkpoint's."""
    stored = meta["recipe"]
    for key in ("name", "model"):
        mine, theirs = getattr(recipe.backbone, key), getattr(stored.backbone, key)
        if mine != theirs:
            raise ConfigError(f"Checkpoint {where} was trained on backbone.{key}={theirs!r}, not {mine!r}")
    mine_t = [s.to_dict() for s in expand_specs(_tuner_dicts(recipe))]
    theirs_t = meta.get("tuners", [])
    if mine_t != theirs_t:
        diffs = [f"#{i}: checkpoint {b} vs recipe {a}" for i, (a, b) in enumerate(zip(mine_t, theirs_t)) if a != b]
        if len(mine_t) != len(theirs_t):
            diffs.append(f"checkpoint has {len(theirs_t)} tuner entries, recipe {len(mine_t)}")
        raise ConfigError(f"Checkpoint {where}: tuner config differs: " + "; ".join(diffs[:5]))


def load_into(model: TunedModel, checkpoint: str | Path, recipe: Recipe | None = None) -> dict[str, Any]:
    """Load a checkpoint's tuner weights into ``model``; with ``recipe``, check it matches first."""
    state, meta = read_checkpoint(checkpoint)
    where = str(meta["folder"])
    if recipe is not None:
        check_compatible(recipe, meta, where)
    try:
        model.load_tuner_state_dict(state)
    except StateDictError as err:
        raise StateDictError(f"Checkpoint {where}: {err}") from None
    return meta


def load_train_state(checkpoint: str | Path) -> dict[str, Any]:
    folder = resolve(checkpoint)
    path = folder / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"Checkpoint {str(folder)!r} has no {STATE_FILE}; it cannot be resumed")
    return torch.load(path, weights_only=False, map_location="cpu")


def load_tuned(checkpoint: str | Path) -> TunedModel:
    """The ``TunedModel`` a checkpoint was trained as: rebuilt from its stored recipe (same backbone
    weights source), with its tuner weights loaded. Returned in eval mode."""
    from utuning.engine import build_model

    state, meta = read_checkpoint(checkpoint)
    model = build_model(meta["recipe"], num_classes=meta.get("num_classes"))
    try:
        model.load_tuner_state_dict(state)
    except StateDictError as err:
        raise StateDictError(f"Checkpoint {meta['folder']}: {err}") from None
    return model.eval()


def export_backbone(checkpoint: str | Path, out: str | Path) -> list[str]:
    """Fold a checkpoint's tuners into the frozen weights and save the backbone model's state dict
    (the original model's keys, e.g. a timm or Hugging Face state dict) as safetensors, atomically.

    Only full fine-tuning (``unfreeze``) and mergeable reparameterisations (LoRA, SSF, BitFit) fold
    into the weights; tuners that live beside them (adapters, prompts, prefixes, side tuners) are
    refused. Tuners at the head are not part of the backbone's weights: their keys are returned,
    and their weights stay in the checkpoint's ``tuner.safetensors``."""
    model = load_tuned(checkpoint)
    specs = model.backbone.site_specs()
    folded = [a.key for a in model.attached() if a.tuner.placement in ("unfreeze", "reparam")]
    at_head = [a.key for a in model.attached()
               if a.key not in folded and a.handle is not None and specs[a.sites[0]].kind == "head"]
    beside = [a.key for a in model.attached() if a.key not in folded and a.key not in at_head]
    if beside:
        raise ConfigError(
            f"Checkpoint {checkpoint}: tuners {beside[:5]} live beside the frozen weights and cannot be folded into "
            "them; only full fine-tuning and mergeable tuners (lora, ssf, bitfit) export as backbone weights"
        )
    model.merge()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.backbone.frozen_state_dict().items()}
    _atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "source": str(checkpoint)}))
    return at_head
