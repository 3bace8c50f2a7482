"""The one place a recipe becomes a model and data: ``build_model`` (seeded), ``build_datasets``,
``model_and_data``. Used by the engine, the CLI (``check``, ``inspect``, ``list sites``) and
checkpoints (``load_tuned``), so every command builds the same model from the same recipe."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from utuning.backbone import build_backbone
from utuning.data import build_dataset
from utuning.data.checks import check_splits, data_description
from utuning.errors import ConfigError
from utuning.model import TunedModel, tune
from utuning.schema import Recipe
from utuning.tuner import TunerSpec


def backbone_kwargs(recipe: Recipe, *, num_classes: int | None = None, pretrained: bool | None = None) -> dict[str, Any]:
    """Keyword arguments of ``Backbone.create`` for ``recipe.backbone``. ``num_classes`` (e.g. from
    the data) applies when the recipe leaves it unset; ``pretrained=False`` skips the weights."""
    b = recipe.backbone
    kwargs: dict[str, Any] = {"model": b.model, "pretrained": b.pretrained if pretrained is not False else False, **b.args}
    classes = b.num_classes if b.num_classes is not None else num_classes
    if classes is not None:
        kwargs["num_classes"] = classes
    if b.img_size is not None:
        kwargs["img_size"] = b.img_size
    return kwargs


def tuner_specs(recipe: Recipe) -> list[TunerSpec]:
    return [TunerSpec(t.name, t.at if isinstance(t.at, str) else list(t.at), dict(t.args), t.key) for t in recipe.tuners]


def _backbone(recipe: Recipe, **kwargs: Any) -> tuple[Any, torch.Tensor]:
    """The backbone built under ``train.seed``, and the RNG state right after (the tuners' seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        backbone = build_backbone(recipe.backbone.name, **backbone_kwargs(recipe, **kwargs))
        return backbone, torch.get_rng_state()


def build_model(recipe: Recipe, *, pretrained: bool | None = None, num_classes: int | None = None,
                data: dict[str, Any] | None = None, backbone: tuple[Any, torch.Tensor] | None = None) -> TunedModel:
    """Backbone + tuners of ``recipe``, built from ``train.seed`` (backbone first, tuners next in the
    same random stream) without touching the global RNG, so every command (``train``, ``check``,
    ``eval``, ``load_tuned``) rebuilds randomly initialised parts identically.

    ``pretrained=False`` skips the weights (structure and parameter counts only); ``num_classes``
    applies when the recipe leaves ``backbone.num_classes`` unset; ``data`` (``data_description``)
    fills tuner arguments that default to the data (``Tuner.from_data``); ``backbone``: what
    ``_backbone`` returned for this recipe, when the data needed the backbone first."""
    built, rng = backbone if backbone is not None else _backbone(recipe, num_classes=num_classes, pretrained=pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        return tune(built, tuner_specs(recipe), data=data)


HOLDOUT = "holdout"  # the split name of ``data.holdout``'s held-out part of ``data.train_split``


def build_datasets(recipe: Recipe, splits: list[str], backbone: Any) -> list[Dataset]:
    """The datasets of ``splits``. With ``data.holdout``, ``data.train_split`` loses a seeded,
    class-stratified fraction of its examples, which the split name ``holdout`` reads."""
    d = recipe.data
    if d.holdout is not None and not (isinstance(d.holdout, (int, float)) and 0 < d.holdout < 1):
        raise ConfigError(f"data.holdout={d.holdout!r} must be a fraction of data.train_split between 0 and 1 "
                          "(e.g. 0.2), or null")
    if HOLDOUT in splits and d.holdout is None:
        raise ConfigError(f"Split {HOLDOUT!r} is the held-out part of data.train_split={d.train_split!r}: set "
                          "data.holdout to the fraction to hold out (e.g. data.holdout=0.2)")
    if d.holdout is not None and d.train_split == HOLDOUT:
        raise ConfigError(f"data.train_split={HOLDOUT!r}: the held-out part is for evaluation; train on "
                          "another split")
    out = []
    for s in splits:
        source = d.train_split if s == HOLDOUT else s
        ds = build_dataset(d.name, split=source, backbone=backbone, root=d.root, **d.args)
        if d.holdout is not None and source == d.train_split:
            if not hasattr(ds, "hold_out"):
                raise ConfigError(f"Dataset {d.name!r} ({type(ds).__name__}) cannot hold out examples "
                                  "(data.holdout); give a separate validation split as data.eval_split")
            ds.hold_out(float(d.holdout), seed=d.holdout_seed, part="holdout" if s == HOLDOUT else "rest")
        out.append(ds)
    return out


def _num_classes(recipe: Recipe, dataset: Dataset) -> int | None:
    found = getattr(dataset, "num_classes", None)
    return 1 if found is None and recipe.task.type == "regression" else found


def model_and_data(recipe: Recipe, splits: list[str], *, data: list[Dataset] | None = None,
                   num_classes: int | None = None, description: dict[str, Any] | None = None
                   ) -> tuple[TunedModel, list[Dataset]]:
    """The model and the datasets of ``splits`` (or the given ``data``), all splits read and checked
    against each other (``check_splits``) before any tuner is built. Datasets need a backbone
    (transforms, tokenizer) and the model needs the data's classes: when neither the recipe nor
    ``num_classes`` gives them, the data is read with a weightless backbone first. ``description``:
    the data description to build tuners with (a checkpoint's), instead of the first split's."""
    known = recipe.backbone.num_classes or num_classes
    backbone = None
    if data is None:
        if known is not None:
            backbone = _backbone(recipe, num_classes=known)
            data = build_datasets(recipe, splits, backbone[0])
        else:
            data = build_datasets(recipe, splits, _backbone(recipe, pretrained=False, num_classes=1)[0])
    data = list(data)
    check_splits(recipe.task.type, data, num_classes=known)
    classes = known or _num_classes(recipe, data[0])
    description = description or data_description(data[0])
    return build_model(recipe, num_classes=classes, data=description, backbone=backbone), data
