"""Checkpoints: tuner weights only, the resolved recipe beside them, resume state apart, all
checksummed, none pickled.

A checkpoint is a folder ``<out>/checkpoints/step_{N:08d}/``::

    tuner.safetensors          TunedModel.tuner_state_dict(); metadata: the resolved recipe (JSON),
                               the model's own ``tuner_config()``, the data description (classes,
                               label names), "num_classes", "step", the format
    recipe.yaml                the same resolved recipe (``utuning eval step_N/recipe.yaml
                               --checkpoint step_N`` rebuilds the same model)
    train_state.{safetensors,json}  counters, raw (non-EMA) tuner weights, optimizer, AMP scaler and
                               EMA state (``utuning.files.save_tree``: tensors + JSON, no pickle)
    rng_{rank}.{safetensors,json}   each process's RNG states
    checksums.json             sha256 and size of every file above, written last

The folder is assembled under a temporary name and renamed, and only then is the ``last`` pointer
(a one-line text file) replaced, so a run killed at any moment leaves the previous complete
checkpoint or the new one. Leftover temporary folders of interrupted saves are removed by the
next save. Reading verifies the checksums: a truncated or altered file is a ``StateDictError``
naming it, and ``find_resumable`` falls back to the newest intact checkpoint, saying so.
Non-finite tuner weights are never written (``DivergedError``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from utuning import plugins
from utuning.errors import ConfigError, DivergedError, RunError, StateDictError
from utuning.export import BackboneExport, check_target, fold_heads, write_atomically
from utuning.files import atomic_text, load_tree, save_tree, verify, write_checksums
from utuning.model import TunedModel
from utuning.recipe.io import recipe_from_dict, recipe_to_dict, recipe_yaml
from utuning.schema import Recipe

TUNER_FILE = "tuner.safetensors"
RECIPE_FILE = "recipe.yaml"
STATE = "train_state"
LAST = "last"
BEST = "best"
FORMAT = "utuning-tuner/2"


def nonfinite(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of tensors holding NaN or infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


# Writing --------------------------------------------------------------------------------------
def write_pointer(folder: Path, name: str, target: str) -> None:
    atomic_text(Path(folder) / name, target + "\n")


def read_pointer(folder: Path, name: str = LAST) -> Path | None:
    """The checkpoint a ``last``/``best`` pointer names, or None if there is no pointer or it dangles."""
    pointer = Path(folder) / name
    if not pointer.is_file():
        return None
    target = Path(folder) / pointer.read_text().strip()
    return target if (target / TUNER_FILE).is_file() else None


def clean_temporary(folder: Path) -> list[Path]:
    """Remove temporary folders left by interrupted saves (one run owns the folder: see ``utuning.engine.run``)."""
    stale = [p for p in Path(folder).glob(".step_*.tmp-*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save_checkpoint(
    folder: str | Path, *, step: int, tuner_state: Mapping[str, Tensor], recipe: Recipe, num_classes: int | None,
    tuners: list[dict[str, Any]], data: Mapping[str, Any] | None = None, train_state: Mapping[str, Any] | None = None,
    rng_states: list[Any] | None = None, best: bool = False, keep: int = 2,
) -> Path:
    """Write checkpoint ``step_{step}`` under ``folder`` atomically, point ``last`` (and ``best``)
    at it, and remove older checkpoints beyond the newest ``keep`` (the best one is kept)."""
    bad = nonfinite(tuner_state) + nonfinite((train_state or {}).get("tuner", {}))
    if bad:
        raise DivergedError(f"Refusing to save checkpoint step {step}: tuner weights {bad[:3]} are not finite")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_temporary(folder)
    name = f"step_{step:08d}"
    final = folder / name
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    meta = {
        "recipe": json.dumps(recipe_to_dict(recipe)),
        "tuners": json.dumps(tuners),
        "backbone": json.dumps({"name": recipe.backbone.name, "model": recipe.backbone.model}),
        "num_classes": json.dumps(num_classes),
        "data": json.dumps(dict(data or {})),
        "step": str(step),
        "format": FORMAT,
    }
    save_file({k: v.detach().contiguous().cpu() for k, v in tuner_state.items()}, str(tmp / TUNER_FILE), metadata=meta)
    (tmp / RECIPE_FILE).write_text(recipe_yaml(recipe))
    if train_state is not None:
        save_tree(dict(train_state), tmp, STATE)
    for rank, rng in enumerate(rng_states or []):
        save_tree(rng, tmp, f"rng_{rank}")
    write_checksums(tmp)
    if final.exists():  # a re-run of the same step (after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_pointer(folder, LAST, name)
    if best:
        write_pointer(folder, BEST, name)
    _prune(folder, keep)
    return final


def _prune(folder: Path, keep: int) -> None:
    protected = {p.name for p in (read_pointer(folder, LAST), read_pointer(folder, BEST)) if p is not None}
    steps = sorted(p for p in folder.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


# Finding -------------------------------------------------------------------------------------
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


def intact(folder: Path) -> str | None:
    """None when every file of the checkpoint matches its checksum, else the reason."""
    try:
        verify(folder)
    except StateDictError as e:
        return str(e)
    return None


def find_resumable(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and notes to print: the one ``last`` names if it is intact,
    else the newest intact one (saying why). None when there is no checkpoint at all; a
    ``RunError`` when there are checkpoints but none is intact."""
    checkpoints = Path(checkpoints)
    found = sorted((p for p in checkpoints.glob("step_*") if p.is_dir()), reverse=True)
    pointer = checkpoints / LAST
    if not found and not pointer.exists():
        return None, []
    notes: list[str] = []
    last = read_pointer(checkpoints)
    if last is None and pointer.exists():
        notes.append(f"{pointer} names {pointer.read_text().strip()!r}, which does not exist")
    elif last is not None:
        why = intact(last)
        if why is None:
            return last, notes
        notes.append(f"the last checkpoint {last.name} is damaged: {why}")
    for candidate in found:
        why = intact(candidate)
        if why is None:
            notes.append(f"resuming from the newest intact checkpoint, {candidate}")
            return candidate, notes
        notes.append(f"{candidate.name} is damaged too: {why}")
    raise RunError(f"--resume: no intact checkpoint under {checkpoints} (" + "; ".join(notes) + "). Start again with "
                   "--overwrite")


# Reading -------------------------------------------------------------------------------------
def read_checkpoint(checkpoint: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tuner weights, metadata: "recipe" as a ``Recipe``, "tuners", "backbone", "num_classes",
    "data", "step", "folder"). The files are verified first; the recipe's plugins are imported."""
    folder = resolve(checkpoint)
    verify(folder, [TUNER_FILE])
    path = folder / TUNER_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise StateDictError(f"{path} cannot be read ({e})") from None
    if "recipe" not in raw:
        raise StateDictError(f"{path} holds no recipe metadata; it was not written by utuning")
    meta: dict[str, Any] = {k: json.loads(raw[k]) for k in ("tuners", "backbone", "num_classes", "data") if k in raw}
    meta["recipe"] = recipe_from_dict(json.loads(raw["recipe"]), where=f"{path} (recipe metadata)")
    meta["step"] = int(raw.get("step", 0))
    meta["folder"] = folder
    plugins.load_all(list(meta["recipe"].imports), where=f"{folder}: the run's imports")
    return state, meta


def check_compatible(model: TunedModel, recipe: Recipe, meta: Mapping[str, Any]) -> None:
    """Fail, naming what differs, when ``model`` (built from ``recipe``) is not the checkpoint's model."""
    where = str(meta["folder"])
    stored = meta["recipe"]
    for key in ("name", "model"):
        mine, theirs = getattr(recipe.backbone, key), getattr(stored.backbone, key)
        if mine != theirs:
            raise ConfigError(f"Checkpoint {where} was trained on backbone.{key}={theirs!r}, not {mine!r}")
    mine_t, theirs_t = model.tuner_config(), meta.get("tuners", [])
    if mine_t != theirs_t:
        diffs = [f"#{i}: checkpoint {b} vs recipe {a}" for i, (a, b) in enumerate(zip(mine_t, theirs_t)) if a != b]
        if len(mine_t) != len(theirs_t):
            diffs.append(f"checkpoint has {len(theirs_t)} tuner entries, recipe {len(mine_t)}")
        raise ConfigError(f"Checkpoint {where}: tuner config differs: " + "; ".join(diffs[:5]))


def check_classes(meta: Mapping[str, Any], dataset: Any) -> None:
    """The checkpoint's class count must be the data's (``eval`` of a 2-class head on 3-class data)."""
    theirs, data = meta.get("num_classes"), getattr(dataset, "num_classes", None)
    if theirs is not None and data is not None and theirs != data:
        raise ConfigError(f"Checkpoint {meta['folder']} was trained with {theirs} classes, but the evaluation data "
                          f"{getattr(dataset, 'name', '')!r} split {getattr(dataset, 'split', '')!r} has {data}; "
                          "evaluate it on data with the same label set")


def load_into(model: TunedModel, checkpoint: str | Path, recipe: Recipe | None = None) -> dict[str, Any]:
    """Load a checkpoint's tuner weights into ``model``; with ``recipe``, check it matches first."""
    state, meta = read_checkpoint(checkpoint)
    if recipe is not None:
        check_compatible(model, recipe, meta)
    try:
        model.load_tuner_state_dict(state)
    except StateDictError as err:
        raise StateDictError(f"Checkpoint {meta['folder']}: {err}") from None
    return meta


def load_train_state(checkpoint: str | Path) -> dict[str, Any]:
    folder = resolve(checkpoint)
    if not (folder / f"{STATE}.json").is_file():
        raise RunError(f"Checkpoint {str(folder)!r} has no {STATE}; it cannot be resumed")
    verify(folder, [f"{STATE}.safetensors", f"{STATE}.json"])
    return load_tree(folder, STATE)


def load_rng(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    folder = Path(checkpoint)
    if not (folder / f"rng_{rank}.json").is_file():
        return None
    verify(folder, [f"rng_{rank}.safetensors", f"rng_{rank}.json"])
    return load_tree(folder, f"rng_{rank}")


def load_tuned(checkpoint: str | Path) -> TunedModel:
    """The ``TunedModel`` a checkpoint was trained as: rebuilt from its stored recipe and data
    description (same backbone weights source), with its tuner weights loaded; in eval mode."""
    from utuning.build import build_model

    state, meta = read_checkpoint(checkpoint)
    model = build_model(meta["recipe"], num_classes=meta.get("num_classes"), data=meta.get("data") or None)
    try:
        model.load_tuner_state_dict(state)
    except StateDictError as err:
        raise StateDictError(f"Checkpoint {meta['folder']}: {err}") from None
    return model.eval()


def export_backbone(checkpoint: str | Path, out: str | Path) -> BackboneExport:
    """Fold a checkpoint's tuners into the frozen weights and write them in the form the backbone's
    own library loads (``Backbone.export_native``): one safetensors file of the original state dict
    (timm; ``--out FILE``) or a ``from_pretrained`` folder (Hugging Face; ``--out DIR``, new or
    empty). Written atomically; see ``utuning.export`` for how ``out`` is checked.

    Only full fine-tuning (``unfreeze``) and mergeable reparameterisations (LoRA, SSF, BitFit...)
    fold into the weights; tuners that live beside them (adapters, prompts, prefixes, side tuners)
    are refused. A head tuner that is exactly one linear layer replacing a head that is one linear
    layer of its shape (``linear_probe`` on a timm ViT or an HF image classifier) is written into
    that head; other head tuners are left out, each with the reason, and their weights stay in the
    checkpoint's ``tuner.safetensors``."""
    model = load_tuned(checkpoint)
    backbone = model.backbone
    path = check_target(out, backbone.native_export, backbone.name)
    specs = backbone.site_specs()
    folded = [a.key for a in model.attached() if a.tuner.placement in ("unfreeze", "reparam")]
    at_head = [a.key for a in model.attached()
               if a.key not in folded and a.handle is not None and specs[a.sites[0]].kind == "head"]
    beside = [a.key for a in model.attached() if a.key not in folded and a.key not in at_head]
    if beside:
        raise ConfigError(
            f"Checkpoint {checkpoint}: tuners {beside[:5]} live beside the frozen weights and cannot be folded into "
            "them; only full fine-tuning and mergeable (reparam) tuners such as lora, ssf, bitfit export as backbone "
            "weights (--format pretrained or peft keep the others)"
        )
    model.merge()
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.frozen_state_dict().items()}
    heads, left = fold_heads(model, at_head, tensors)
    bad = nonfinite(tensors)
    if bad:
        raise DivergedError(f"Checkpoint {checkpoint}: merged weights {bad[:3]} are not finite; nothing written")
    metadata = {"format": "pt", "source": str(checkpoint)}
    notes = write_atomically(path, backbone.native_export, lambda tmp: backbone.export_native(tmp, tensors, metadata))
    return BackboneExport(path, backbone.native_export, heads, left, list(notes or []))
