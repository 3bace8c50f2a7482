"""Every recipe of the zoo validates, and every distinct model it describes builds (tiny backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utuning import cli
from utuning.recipe import load_recipe, recipe_to_dict

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LEAVES = sorted(p for p in RECIPES.rglob("*.yaml") if "base" not in p.relative_to(RECIPES).parts)
VISION_DATA = ["cifar100", "cub200", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"]
VISION_METHODS = ["full", "linear", "bitfit", "vpt_shallow", "vpt_deep", "prefix", "adapter", "adaptformer", "lora",
                  "ssf", "u_tuning", "dual_u_tuner", "tri_u_tuner", "res_tuning_bypass", "ytuning"]


def structure(recipe) -> str:
    """What the built model depends on (its tiny backbone included), apart from the number of classes."""
    d = recipe_to_dict(recipe)
    tuners = [{**t, "args": {k: v for k, v in t["args"].items() if k not in ("num_classes", "num_labels")}} for t in d["tuners"]]
    return json.dumps({"backbone": {k: v for k, v in d["backbone"].items() if k != "num_classes"}, "tuners": tuners},
                      sort_keys=True)


def test_the_zoo_is_complete() -> None:
    names = {p.relative_to(RECIPES).as_posix() for p in LEAVES}
    missing = [f"vision/{d}/{m}.yaml" for d in VISION_DATA for m in VISION_METHODS if f"vision/{d}/{m}.yaml" not in names]
    assert not missing
    assert {"quickstart/linear_probe.yaml", "quickstart/lora.yaml", "quickstart/dual_u_tuner.yaml",
            "quickstart/prefix.yaml"} <= names
    assert len([n for n in names if n.startswith("glue/")]) >= 100


def test_every_recipe_validates_and_every_distinct_model_builds(capsys) -> None:
    first: dict[str, Path] = {}
    for path in LEAVES:  # load_recipe validates: names, tuner arguments, values
        recipe = load_recipe(path)
        assert recipe.description and recipe.name, path
        first.setdefault(structure(recipe), path)
    code = cli.main(["check", "--tiny", *map(str, first.values())])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.count("ok ") == len(first) >= 30


@pytest.mark.parametrize("path", [RECIPES / "vision" / "cub200" / "res_tuning_bypass.yaml",
                                  RECIPES / "glue" / "roberta_base" / "stsb" / "ytuning.yaml"])
def test_class_counts_reach_side_tuners(path: Path) -> None:
    recipe = load_recipe(path)
    args = recipe.tuners[0].args
    assert args.get("num_classes", args.get("num_labels")) == recipe.backbone.num_classes in (200, 1)


def test_quickstart_uses_the_packaged_minilm() -> None:
    recipe = load_recipe(RECIPES / "quickstart" / "lora.yaml")
    assert (Path(recipe.backbone.model) / "config.json").is_file() and recipe.data.name == "vader_lexicon"
    assert recipe.train.epochs <= 3 and recipe.train.precision == "no"
