"""``utuning export``: a trained run as merged backbone weights that timm loads, and as an HF PEFT
adapter folder that ``PeftModel.from_pretrained`` loads with equal outputs."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.test_engine import TINY_VIT, tiny_data, tiny_recipe
from utuning.build import _backbone
from utuning.checkpoint import load_tuned
from utuning.cli import main
from utuning.engine import train
from utuning.schema import TunerConfig

LORA = [TunerConfig(name="lora", at="blocks.*.attn.qkv", args={"rank": 2}),
        TunerConfig(name="linear_probe", at="head")]


def plain_vit(recipe) -> torch.nn.Module:
    """The run's frozen backbone (random init under its seed) as a plain timm model."""
    model = timm.create_model(recipe.backbone.model, pretrained=False, img_size=32, num_classes=4, **TINY_VIT)
    model.load_state_dict(_backbone(recipe, num_classes=4)[0].frozen_state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    recipe = tiny_recipe(out, tuners=LORA, epochs=1)
    train(recipe, data=tiny_data())
    return recipe, out


def test_merged_weights_load_into_timm(run, tmp_path, capsys):
    recipe, out = run
    assert main(["export", str(out), "--out", str(tmp_path / "w.safetensors")]) == 0
    tuned = load_tuned(out)
    plain = plain_vit(recipe)
    missing = plain.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert not missing.missing_keys and not missing.unexpected_keys
    x = tiny_data()[1].images[:4]
    with torch.no_grad():
        # The head is the run's linear probe (a tuner, kept in the checkpoint), so compare pre-logits.
        torch.testing.assert_close(plain.forward_head(plain.forward_features(x), pre_logits=True),
                                   tuned.backbone.intermediates(x, layers=[]).pooled, atol=1e-5, rtol=1e-4)


def test_peft_folder_loads_with_equal_outputs(run, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    recipe, out = run
    folder = tmp_path / "adapter"
    assert main(["export", str(out), "--format", "peft", "--out", str(folder)]) == 0, capsys.readouterr().err
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(plain_vit(recipe), str(folder)).eval()
    x = tiny_data()[1].images[:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), load_tuned(out)(pixel_values=x), atol=1e-5, rtol=1e-4)


def test_peft_export_refuses_tuners_without_a_peft_form(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_recipe(out, epochs=1), data=tiny_data())  # p_adapter: no PEFT form
    code = main(["export", str(out), "--format", "peft", "--out", str(tmp_path / "adapter")])
    assert code == 2 and "p_adapter" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()


def test_pretrained_folder_round_trips_without_the_recipe(run, tmp_path, capsys):
    import utuning

    recipe, out = run
    folder = tmp_path / "pretrained"
    assert main(["export", str(out), "--format", "pretrained", "--out", str(folder)]) == 0
    x = tiny_data()[1].images[:4]
    reference = load_tuned(out)
    rebuilt = utuning.from_pretrained(folder)  # the backbone from the folder's own description
    onto = utuning.from_pretrained(folder, backbone=plain_vit(recipe))  # onto a model built by hand
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixel_values=x), reference(pixel_values=x))
        torch.testing.assert_close(onto(pixel_values=x), reference(pixel_values=x))
    weights = folder / "tuner.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(utuning.StateDictError, match="tuner.safetensors is truncated"):
        utuning.from_pretrained(folder)
