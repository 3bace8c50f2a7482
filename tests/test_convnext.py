"""timm ConvNeXt under utuning (a network without attention), and the Convpass tuner: equivalence
with timm, every registered tuner works or is refused with the reason, pointwise 1x1 convolutions
merged through their linear view, side tuners and the cache on stage outputs, Convpass equal to
the paper's computation on feature maps and on ViT tokens with a class token."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import utuning
from tests.helpers import assert_only_tuner_grads, call, one_thread, randomize_tuners, tiny_vit  # noqa: F401
from tests.test_swin import check_zoo_tuner, expected_outcome, tiny_swin, zoo_params
from utuning.backbones.convnext import ConvNeXtBackbone
from utuning.cache import FeatureCache

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_convnext(num_classes: int = 5, *, seed: int = 0, **kwargs) -> torch.nn.Module:
    """Four stages (1, 1, 1, 2 blocks; widths 8 to 32) on 32x32 images, 1x1-conv MLPs as in
    convnext_atto, a layer scale of 0.5 so that every block matters; built offline."""
    torch.manual_seed(seed)
    args = {"depths": (1, 1, 1, 2), "dims": (8, 16, 24, 32), "conv_mlp": True, "ls_init_value": 0.5,
            "num_classes": num_classes, **kwargs}
    return timm.create_model("convnext_atto", pretrained=False, **args).eval()


@pytest.fixture(scope="module")
def images():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


# Tuners this family refuses, and why (any other tuner must work, unless no site offers its
# placement at all: see ``expected_outcome``).
CONVNEXT_REFUSED = {
    "prompt": "no token sequence to insert prompts into",
    "prefix": "no attention", "prompt_parallel": "no attention", "p_prefix": "no frozen query projection",
    "p_prompt": "no frozen query or key/value projections", "adaption_prompt": "no attention",
}
CONVNEXT_GAPS: dict[str, str] = {}


@pytest.mark.parametrize("name", zoo_params(CONVNEXT_GAPS))
def test_every_registered_tuner_works_or_is_refused(name, images):
    # Blocks 1 (opens stage 1: downsampling, new width) and 4 (last stage).
    outcome = check_zoo_tuner(name, tiny_convnext, images, side_at="stages.3", layers={1, 4})
    assert outcome == expected_outcome(name, tiny_convnext, CONVNEXT_REFUSED), outcome


@pytest.mark.parametrize("kwargs", [{}, {"conv_mlp": False}, {"head_norm_first": True, "ls_init_value": None}],
                         ids=["conv-mlp", "linear-mlp", "norm-first-no-layer-scale"])
def test_untuned_equals_timm_forward_and_intermediates(kwargs, images):
    ref = tiny_convnext(**kwargs)
    x = images["pixel_values"]
    backbone = utuning.wrap(copy.deepcopy(ref))
    assert isinstance(backbone, ConvNeXtBackbone)
    with torch.no_grad():
        final, stages = ref.forward_intermediates(x)
        feats = backbone.intermediates(x, layers=[0, 1, 2, 4])
        torch.testing.assert_close(backbone(pixel_values=x), ref(x), atol=1e-6, rtol=0)
    for i, stage_out in zip((0, 1, 2, 4), stages):  # the last block of each stage is timm's stage output
        torch.testing.assert_close(feats.layers[i], stage_out.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.final, final.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.pooled, ref.forward_head(final, pre_logits=True), atol=1e-6, rtol=0)
    assert set(backbone.frozen_state_dict()) == set(ref.state_dict())


def test_sites_stage_selector_and_full_coverage():
    backbone = utuning.wrap(tiny_convnext())
    specs = backbone.site_specs()
    assert backbone.stages == [range(0, 1), range(1, 2), range(2, 3), range(3, 5)]
    assert (specs["blocks.1"].dim, specs["blocks.4"].dim, specs["head"].dim) == (16, 32, 32)
    assert (specs["blocks.1.mlp.fc1"].dim, specs["blocks.1.mlp.fc1"].out_dim) == (16, 64)
    assert specs["blocks.1.downsample.conv"].info["stride"] == (2, 2) and specs["embed.stem.0"].kind == "conv"
    assert backbone.match("stages.3.mlp.fc2") == ["blocks.3.mlp.fc2", "blocks.4.mlp.fc2"]
    tuned = utuning.tune(backbone, [("full_finetune", "**")])
    assert {id(p) for p in tuned.trainable_parameters()} == {id(p) for p in backbone.model.parameters()}


def test_refusals_name_the_variant_and_the_reason():
    v2 = timm.create_model("convnextv2_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    with pytest.raises(utuning.UnsupportedModelError, match="GlobalResponseNormMlp.*ConvNeXt-V2"):
        ConvNeXtBackbone(v2)
    backbone = utuning.wrap(tiny_convnext())
    for specs, why in (([("vpt_deep", "blocks.*")], "no token sequence"), ([("prefix", "blocks.0")], "no attention: no keys"),
                       ([("p_prefix", "blocks.*")], "no attention, so no frozen query"),
                       ([("dual_u_tuner", "blocks.*")], "matches no site"),
                       ([("conv_lora", "blocks.0.conv_dw")], "groups=8")):
        with pytest.raises(utuning.UtuningError, match=why):
            utuning.tune(backbone, specs)
    assert all(len(backbone.slot(s)) == 0 for s in backbone.site_names())
    assert all(p.requires_grad for p in backbone.model.parameters())


def test_pointwise_convolutions_merge_through_their_linear_view(images):
    """LoRA on 1x1-conv MLP layers trains through the linear view and merges into the (C_out, C_in,
    1, 1) convolution weight itself: same outputs merged, weights restored after unmerge."""
    ref = tiny_convnext()
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("lora", "blocks.*.mlp.*", {"rank": 2}),
                                                            ("ssf", "blocks.4.mlp.fc2", {})]).eval()
    randomize_tuners(tuned, std=0.3)
    conv = tuned.backbone.model.stages[3].blocks[1].mlp.fc2
    before = conv.weight.clone()
    with torch.no_grad():
        expected = tuned(**images)
        tuned.merge()
        assert conv.weight.shape == (32, 128, 1, 1) and not torch.allclose(conv.weight, before)
        torch.testing.assert_close(tuned(**images), expected, atol=1e-5, rtol=0)
        # The merged weights alone, loaded into timm's own model, give the tuned outputs.
        plain = copy.deepcopy(ref)
        plain.load_state_dict(tuned.backbone.model.state_dict())
        torch.testing.assert_close(plain(images["pixel_values"]), expected, atol=1e-5, rtol=0)
        tuned.unmerge()
    torch.testing.assert_close(conv.weight, before, atol=1e-6, rtol=0)


def test_side_tuners_read_stage_outputs_and_cache(tmp_path, images):
    ref = tiny_convnext()
    data = [(images["pixel_values"][i], i) for i in range(2)]
    for specs in ([("bypass", "stages.3", {"num_classes": 5, "hidden": 4, "pool": "mean"})],
                  [("ytuning", "stages.3", {"num_labels": 5, "hidden": 8, "heads": 2, "dropout": 0.0})]):
        tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), specs).eval()
        assert tuned.side_layers == [3, 4]
        cached = FeatureCache(tmp_path).dataset(tuned, data, batch_size=2)
        feats, _ = cached.collate([cached[0], cached[1]])
        assert feats.layers[4].shape == (2, 1, 32)  # 32x32 image, stride 32: one position
        with torch.no_grad():
            torch.testing.assert_close(tuned.side_forward(feats), tuned(**images), atol=1e-5, rtol=0)
        assert_only_tuner_grads(tuned, images)


# Convpass -------------------------------------------------------------------------------------
def _randomized(model: torch.nn.Module, specs) -> utuning.TunedModel:
    tuned = utuning.tune(utuning.wrap(model), specs).eval()
    randomize_tuners(tuned, std=0.3)
    return tuned


def test_convpass_on_feature_maps_is_a_convolution(images):
    tuned = _randomized(tiny_convnext(), [("convpass", "blocks.1", {"hidden": 4, "scale": 0.5})])
    tuner = tuned.backbone.slot("blocks.1").tuners["convpass"]
    x = torch.randn(2, 4, 4, 16)  # (B, H, W, C) channels-last map
    act = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731  QuickGELU
    h = act(tuner.down(x)).permute(0, 3, 1, 2)
    h = act(F.conv2d(h, tuner.conv.weight, tuner.conv.bias, padding=1)).permute(0, 2, 3, 1)
    torch.testing.assert_close(tuner(x, None), 0.5 * tuner.up(h))
    with torch.no_grad():
        assert not torch.allclose(tuned(**images), tiny_convnext()(images["pixel_values"]))


def test_convpass_on_vit_tokens_follows_the_paper(images):
    """On a ViT the patch tokens are convolved on their grid and the class token as a 1x1 map
    (only the centre tap), as in the paper's code; prompts at the same site break the grid."""
    tuned = _randomized(tiny_vit(num_classes=5), [("convpass", "blocks.0.attn", {"hidden": 4})])
    tuner = tuned.backbone.slot("blocks.0.attn").tuners["convpass"]
    x = torch.randn(2, 17, 32)  # class token + 4x4 patches
    act = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731
    h = act(tuner.down(x))  # (B, 17, 4)
    patch = F.conv2d(h[:, 1:].reshape(2, 4, 4, 4).permute(0, 3, 1, 2), tuner.conv.weight, tuner.conv.bias, padding=1)
    cls = F.conv2d(h[:, :1].reshape(2, 1, 1, 4).permute(0, 3, 1, 2), tuner.conv.weight, tuner.conv.bias, padding=1)
    h = torch.cat([cls.permute(0, 2, 3, 1).reshape(2, 1, 4), patch.permute(0, 2, 3, 1).reshape(2, 16, 4)], 1)
    torch.testing.assert_close(tuner(x, None), tuner.up(act(h)))
    with pytest.raises(utuning.ConfigError, match="cannot lay 19 tokens"):
        tuner(torch.randn(2, 20, 32), None)
    bad = utuning.tune(utuning.wrap(tiny_vit()), [("convpass", "blocks.0", {"hidden": 4}),
                                                  ("prompt", "blocks.0", {"tokens": 3})])
    with pytest.raises(utuning.ConfigError, match="prompt tokens at the same site"):
        bad(**images)


def test_convpass_on_swin_uses_each_stage_grid(images):
    tuned = _randomized(tiny_swin(), [("convpass", "stages.*", {"hidden": 4})])
    grids = {a.sites[0]: a.tuner.site.info["grid"] for a in tuned.attached()}
    assert grids == {"blocks.0": (16, 16), "blocks.1": (16, 16), "blocks.2": (8, 8), "blocks.3": (8, 8)}
    with torch.no_grad():
        assert tuned(**images).isfinite().all()


def test_build_by_name_and_gradient_checkpointing(images):
    backbone = utuning.build_backbone("convnext", model="convnext_atto", num_classes=5, img_size=32,
                                      depths=(1, 1, 1, 2), dims=(8, 16, 24, 32), ls_init_value=0.5)
    assert isinstance(backbone, ConvNeXtBackbone)
    tuned = utuning.tune(backbone, [("convpass", "stages.{1..3}", {"hidden": 4}), ("lora", "blocks.*.mlp.fc1", {"rank": 2}),
                                    ("conv_lora", "blocks.1.downsample.conv", {"rank": 2})])
    randomize_tuners(tuned)
    tuned.eval()  # no dropout or stochastic depth: the two passes must match
    grads = []
    for enable in (False, True):
        tuned.set_grad_checkpointing(enable)
        tuned.zero_grad()
        tuned(**images).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in tuned.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
