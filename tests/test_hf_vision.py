"""Hugging Face vision encoders (ViT, DINOv2, CLIP, SigLIP): equivalence with HF's forward and hidden
states, the tuner zoo (registry-driven), the exact parallel forms, side tuners, the feature cache, wrap."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn

import utuning
from tests.helpers import call, one_thread, randomize_tuners  # noqa: F401 (one_thread: fixture)
from tests.test_eva import ZOO, check_feature_cache, check_zoo_composition, check_zoo_tuner
from utuning.backbones.hf_vision import HFVisionBackbone
from utuning.errors import ConfigError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
#: name -> (model class, config class, overrides).
CONFIGS = {
    "vit": (tf.ViTModel, tf.ViTConfig, {"intermediate_size": 64}),
    "vit_classifier": (tf.ViTForImageClassification, tf.ViTConfig, {"intermediate_size": 64, "num_labels": 5}),
    "dinov2": (tf.Dinov2Model, tf.Dinov2Config, {"layerscale_value": 0.5}),
    "dinov2_swiglu": (tf.Dinov2Model, tf.Dinov2Config, {"use_swiglu_ffn": True, "layerscale_value": 0.5}),
    "dinov2_reg": (tf.Dinov2WithRegistersModel, tf.Dinov2WithRegistersConfig, {"num_register_tokens": 2,
                                                                                "layerscale_value": 0.5}),
    "clip": (tf.CLIPVisionModel, tf.CLIPVisionConfig, {"intermediate_size": 64}),
    "siglip": (tf.SiglipVisionModel, tf.SiglipVisionConfig, {"intermediate_size": 64}),
}
FAMILIES = ["vit_classifier", "dinov2", "clip", "siglip", "dinov2_reg"]


def tiny_hf(config: str, seed: int = 0) -> nn.Module:
    model_cls, config_cls, extra = CONFIGS[config]
    torch.manual_seed(seed)
    return model_cls(config_cls(**TINY, **extra)).eval()


def reference(hf: nn.Module):
    """What the adapter's forward must equal: logits, or HF's pooled output (the class token for DINOv2)."""
    def run(inputs: dict) -> torch.Tensor:
        out = hf(**inputs)
        if hasattr(out, "logits"):
            return out.logits
        return out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
    return run


def pixels(batch: int = 2, dtype=torch.float32) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=dtype)}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_no_tuner_equals_hf_and_hidden_states(config):
    hf = tiny_hf(config)
    backbone = HFVisionBackbone(copy.deepcopy(hf)).eval()
    assert backbone.model.state_dict().keys() == hf.state_dict().keys()
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(backbone(**x), reference(hf)(x), atol=1e-6, rtol=0)
        out = getattr(hf, "vit", hf)(**x, output_hidden_states=True)  # the encoder of a classifier
        feats = backbone.intermediates(**x, layers=[0, 1])
    hidden = out.hidden_states  # (embeddings, layer 0, layer 1)
    for i in (0, 1):
        torch.testing.assert_close(feats.layers[i], hidden[i + 1], atol=1e-6, rtol=0)
    base = backbone.base[0]
    last = out.last_hidden_state if config not in ("clip",) else base.post_layernorm(out.last_hidden_state)
    torch.testing.assert_close(feats.final, last, atol=1e-6, rtol=0)


#: Every tuner runs on one HF family in turn (the layer is one class for all four), and these on each.
CORE = ["lora", "p_prompt", "prefix", "prompt", "full"]
ZOO_CASES = sorted({(FAMILIES[i % len(FAMILIES)], n) for i, n in enumerate(ZOO)}
                   | {(f, n) for f in FAMILIES for n in CORE if n in ZOO})


@pytest.mark.parametrize(("config", "name"), ZOO_CASES)
def test_zoo(config, name):
    hf = tiny_hf(config)
    # An encoder has no frozen classifier for linear_probe to start from: a new head changes the outputs.
    changing = frozenset() if config == "vit_classifier" else frozenset({"linear_probe"})
    check_zoo_tuner(name, lambda: utuning.wrap(copy.deepcopy(hf)), reference(hf), pixels(), changing=changing)


@pytest.mark.parametrize("name", sorted(utuning.COMPOSITIONS))
def test_compositions(name):
    hf = tiny_hf("vit_classifier")
    check_zoo_composition(name, lambda: utuning.wrap(copy.deepcopy(hf)), reference(hf), pixels())


@pytest.mark.parametrize("config", ["vit_classifier", "siglip", "dinov2_reg"])
def test_prefix_parallel_form_and_prompt_equals_prompt_parallel(config):
    """float64, 1e-10; SigLIP has no class token, so its prompts go first; DINOv2-reg's go after 3 tokens."""
    x = pixels(dtype=torch.float64)

    def make(specs):
        return utuning.tune(utuning.wrap(tiny_hf(config).double()), specs).double().eval()

    joint = make([("prefix", "blocks.*.attn", {"tokens": 3})])
    randomize_tuners(joint, std=0.5)
    parallel = make([("prefix", "blocks.*.attn", {"tokens": 3, "form": "parallel"})])
    parallel.load_tuner_state_dict(joint.tuner_state_dict())
    deep = make([("prompt", "blocks.*", {"tokens": 3})])
    randomize_tuners(deep, std=0.5)
    par = make([("prompt_parallel", "blocks.*.attn", {"tokens": 3})])
    par.load_tuner_state_dict({k.replace(".prompt.", ".attn.prompt_parallel."): v for k, v in deep.tuner_state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(parallel(**x), joint(**x), atol=1e-10, rtol=0)
        a, b = deep.backbone.intermediates(**x, layers=[0, 1]), par.backbone.intermediates(**x, layers=[0, 1])
        for i in (0, 1):
            torch.testing.assert_close(a.layers[i], b.layers[i], atol=1e-10, rtol=0)
        torch.testing.assert_close(deep(**x), par(**x), atol=1e-10, rtol=0)
        assert not torch.allclose(deep(**x), reference(tiny_hf(config).double())(x), atol=1e-4)


def test_side_tuners_and_feature_cache(tmp_path):
    hf = tiny_hf("dinov2")
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(hf)), [("bypass", "blocks.*", {"num_classes": 3, "hidden": 4}),
                                                            ("ytuning", "blocks.*", {"num_labels": 3, "hidden": 8,
                                                                                     "heads": 2})])
    out = tuned(**pixels())
    assert out["bypass"].shape == (2, 3) and out["ytuning"].shape == (2, 3)
    check_feature_cache(tuned, pixels(4)["pixel_values"], tmp_path)


def test_wrap_create_and_refusals():
    assert isinstance(utuning.wrap(tiny_hf("clip")), HFVisionBackbone)
    tiny = {k: v for k, v in TINY.items() if k != "image_size"}
    backbone = utuning.build_backbone("hf_vision", model="vit", num_classes=4, img_size=32, **tiny, intermediate_size=64)
    assert isinstance(backbone.model, tf.ViTForImageClassification)
    assert backbone(**backbone.example_inputs(1)).shape == (1, 4)
    assert backbone.site_names()[:8] == ["embed", "blocks.0", "blocks.0.attn", "blocks.0.mlp", "blocks.0.attn.q",
                                         "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.proj"]
    swiglu = utuning.wrap(tiny_hf("dinov2_swiglu"))
    assert {"blocks.0.mlp.fc1_g", "blocks.0.mlp.fc1_x", "blocks.0.mlp.fc2"} <= set(swiglu.site_names())
    with pytest.raises(ConfigError, match="hidden_sise.*hidden_size"):
        utuning.build_backbone("hf_vision", model="dinov2", hidden_sise=32)
    with pytest.raises(ConfigError, match="attach linear_probe"):
        utuning.build_backbone("hf_vision", model="siglip_vision_model", num_classes=3, **TINY)
    with pytest.raises(UnsupportedModelError, match="VisionLayer"):
        HFVisionBackbone(swiglu.model)  # already re-written: refused by name
    changed = tiny_hf("dinov2")  # a layer lacking what the re-written forward reads (a changed library version)
    del changed.encoder.layer[1].mlp.activation_fn
    with pytest.raises(UnsupportedModelError, match=r"encoder\.layer\.1\.mlp.*lacks \['activation_fn'\]"):
        HFVisionBackbone(changed)
    assert type(changed.encoder.layer[0]).__name__ == "Dinov2Layer"  # nothing was re-written


@pytest.mark.parametrize("specs", [[("prompt", "blocks.*", {"tokens": 2})], [("lora", "blocks.*.attn.q", {"rank": 2})]])
def test_grad_checkpointing_same_outputs_and_grads(specs):
    results = []
    for enable in (False, True):
        tuned = utuning.tune(utuning.wrap(tiny_hf("dinov2")), specs).eval()
        randomize_tuners(tuned)
        tuned.set_grad_checkpointing(enable)
        out = tuned(**pixels())
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in tuned.named_trainable_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for k, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][k])
