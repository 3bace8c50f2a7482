"""timm Swin (v1) under utuning: equivalence with timm, hierarchical sites and the stage selector,
prefixes inside shifted-window attention (exact parallel form), every registered tuner (works or
is refused before anything changes), side tuners and the feature cache on stage outputs.

``check_zoo_tuner`` is the registry-driven check shared with ``test_convnext.py``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch

import utuning
from tests.helpers import (  # noqa: F401 (one_thread: fixture)
    assert_only_tuner_grads,
    assert_state_round_trip,
    call,
    one_thread,
    randomize_tuners,
    tiny_vit,
)
from utuning.backbones.swin import SwinBackbone
from utuning.cache import FeatureCache

pytestmark = pytest.mark.usefixtures("one_thread")

# Small values for whichever size arguments a tuner has, so the zoo runs in seconds.
SMALL = {"rank": 2, "hidden": 4, "tokens": 2, "block_size": 4, "heads": 2, "num_classes": 5, "num_labels": 5,
         "dropout": 0.0}


def tiny_swin(num_classes: int = 5, *, seed: int = 0, **kwargs) -> torch.nn.Module:
    """Two stages of two blocks (the second of each shifted), widths 16 and 32, 16x16 then 8x8
    tokens in 4x4 windows, on 32x32 images; built offline."""
    torch.manual_seed(seed)
    args = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2),
            "num_heads": (2, 4), "mlp_ratio": 2, "num_classes": num_classes, **kwargs}
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **args).eval()


@pytest.fixture(scope="module")
def images():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


# Registry-driven zoo check ----------------------------------------------------------------
def small_args(cls) -> dict:
    return {k: v for k, v in SMALL.items() if k in cls.hyperparameters()}


def fitting_sites(backbone: utuning.Backbone, cls) -> list[str]:
    """Sites the tuner's checks and constructor accept (e.g. conv_lora refuses grouped convolutions)."""
    out = []
    for name, spec in backbone.site_specs().items():
        try:
            cls.check_site(spec)
            if cls.placement != "side":
                cls(site=spec, **small_args(cls))
        except utuning.UtuningError:
            continue
        out.append(name)
    return out


@functools.cache
def identity_on_vit(name: str) -> bool | None:
    """Whether tuner ``name`` starts as the identity on a tiny ViT (the oracle for other families);
    None if it attaches nowhere there."""
    ref = tiny_vit(num_classes=5).eval()
    cls = utuning.TUNERS.get(name)
    backbone = utuning.wrap(copy.deepcopy(ref))
    sites = fitting_sites(backbone, cls)
    if not sites:
        return None
    x = torch.randn(2, 3, 32, 32)
    at = sites[-2:] if cls.placement == "side" else sites
    try:
        tuned = utuning.tune(backbone, [(name, at, small_args(cls))]).eval()
    except utuning.UtuningError:  # refused on attach at some ViT site: judge it at the other family alone
        return None
    with torch.no_grad():
        out = call(tuned, {"pixel_values": x})
        return out.shape == ref(x).shape and torch.allclose(out, ref(x), atol=1e-5, rtol=0)


def assert_untouched(backbone: utuning.Backbone, state: dict) -> None:
    assert all(len(backbone.slot(s)) == 0 for s in backbone.site_names()), "a refused tuner was attached"
    assert all(p.requires_grad for p in backbone.model.parameters()), "a refused tuner froze the model"
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(v, state[k]), f"a refused tuner changed {k}"


def expected_outcome(name: str, make_model, refused: dict[str, str]) -> str:
    """"refused" for the family's listed refusals and for tuners whose placement no site of their
    kinds offers at all (e.g. a text-embedding tuner on a vision model); "works" otherwise."""
    cls = utuning.TUNERS.get(name)
    specs = utuning.wrap(make_model()).site_specs().values()
    offered = cls.placement == "side" or any(
        cls.placement in s.placements and (not cls.site_kinds or s.kind in cls.site_kinds) for s in specs)
    return "refused" if name in refused or not offered else "works"


def check_zoo_tuner(name: str, make_model, inputs: dict, side_at: str, layers: set[int]) -> str:
    """Tuner ``name`` on a fresh ``make_model()``: either it fits some sites and then starts as the
    identity (where it does on a ViT), trains only its own parameters, reloads from its state dict
    and merges exactly (where mergeable); or it fits none and attaching it anywhere of its kinds is
    refused, with the reason, before anything changes. Returns "works" or "refused"."""
    cls = utuning.TUNERS.get(name)
    ref = make_model()
    backbone = utuning.wrap(copy.deepcopy(ref))
    site_specs = backbone.site_specs()
    # Sites outside blocks, and those of the chosen blocks (the zoo stays fast on two cores).
    sites = [side_at] if cls.placement == "side" else [
        s for s in fitting_sites(backbone, cls) if site_specs[s].layer is None or site_specs[s].layer in layers]
    if not sites:
        state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
        kinds = cls.site_kinds or {s.kind for s in backbone.site_specs().values()}
        targets = [n for n, s in backbone.site_specs().items() if s.kind in kinds] or backbone.site_names()
        with pytest.raises(utuning.UtuningError) as err:
            utuning.tune(backbone, [(name, targets, small_args(cls))])
        msg = str(err.value)  # names the tuner and why: the site's reason, or what it offers / fits
        assert repr(name) in msg or name in msg, msg
        assert any(w in msg for w in ("cannot take", "offers", "attaches to", "refuse", "adapts")), msg
        assert_untouched(backbone, state)
        return "refused"
    specs = [(name, sites, small_args(cls))]
    make = lambda: utuning.tune(utuning.wrap(copy.deepcopy(ref)), specs)  # noqa: E731
    tuned = make().eval()
    with torch.no_grad():
        before = call(tuned, inputs)
        if identity_on_vit(name):
            torch.testing.assert_close(before, ref(inputs["pixel_values"]), atol=1e-5, rtol=0)
        randomize_tuners(tuned, std=0.2)
        after = call(tuned, inputs)
    assert tuned.trainable_parameters(), f"{name} trains nothing"
    assert not torch.allclose(after, before), f"moving {name}'s weights does not change the outputs"
    assert_only_tuner_grads(tuned, inputs)
    assert_state_round_trip(make, inputs)
    if cls.placement == "reparam" and type(tuned.attached()[0].tuner).merge is not utuning.Tuner.merge:
        check_merge(tuned, inputs)
    return "works"


def check_merge(tuned: utuning.TunedModel, inputs: dict) -> None:
    """merge() keeps the outputs and changes the frozen weights; unmerge() restores them. A merge
    that cannot happen (e.g. BitFit on a layer without bias) fails with the reason and changes nothing."""
    tuned.eval()
    frozen = {k: v.clone() for k, v in tuned.backbone.model.state_dict().items()}
    with torch.no_grad():
        expected = call(tuned, inputs)
        try:
            tuned.merge()
        except utuning.PlacementError as e:
            assert "no bias" in str(e) or "cannot" in str(e), str(e)
            for k, v in tuned.backbone.model.state_dict().items():  # rolled back (up to rounding)
                torch.testing.assert_close(v, frozen[k], atol=1e-6, rtol=1e-6)
            return
        torch.testing.assert_close(call(tuned, inputs), expected, atol=1e-4, rtol=1e-4)
        assert any(not torch.equal(v, frozen[k]) for k, v in tuned.backbone.model.state_dict().items())
        tuned.unmerge()
        for k, v in tuned.backbone.model.state_dict().items():
            torch.testing.assert_close(v, frozen[k], atol=1e-5, rtol=1e-5)


# Tuners this family refuses, and why (any other tuner must work, unless no site offers its
# placement at all: see ``expected_outcome``).
SWIN_REFUSED = {"prompt": "attention is per window: an inserted token has no window",
                "conv_lora": "Swin has no convolution sites"}
# Known gaps of registered tuners on this family, kept visible (strict: a fix makes them fail).
SWIN_GAPS: dict[str, str] = {}


def zoo_params(gaps: dict[str, str]) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=gaps[n])) if n in gaps else n
            for n in utuning.TUNERS]


@pytest.mark.parametrize("name", zoo_params(SWIN_GAPS))
def test_every_registered_tuner_works_or_is_refused(name, images):
    # Blocks 1 (shifted windows) and 2 (opens stage 1: patch merging, new width).
    outcome = check_zoo_tuner(name, tiny_swin, images, side_at="stages.1", layers={1, 2})
    assert outcome == expected_outcome(name, tiny_swin, SWIN_REFUSED), outcome


# Equivalence ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"window_size": 3}, {"qkv_bias": False, "num_classes": 0}],
                         ids=["shifted-windows", "padded-windows", "no-qkv-bias-no-head"])
def test_untuned_equals_timm_forward_and_intermediates(kwargs, images):
    ref = tiny_swin(**kwargs)
    x = images["pixel_values"]
    backbone = utuning.wrap(copy.deepcopy(ref))
    assert isinstance(backbone, SwinBackbone)
    assert any(any(b.shift_size) for st in ref.layers for b in st.blocks)  # shifted windows are exercised
    with torch.no_grad():
        final, stages = ref.forward_intermediates(x)
        feats = backbone.intermediates(x, layers=[1, 3])
        torch.testing.assert_close(backbone(pixel_values=x), ref(x), atol=1e-6, rtol=0)
        tuned = utuning.tune(backbone, [])
        torch.testing.assert_close(tuned(pixel_values=x), ref(x), atol=1e-6, rtol=0)
    for i, stage_out in zip((1, 3), stages):  # the last block of each stage is timm's stage output
        torch.testing.assert_close(feats.layers[i], stage_out.permute(0, 2, 3, 1).flatten(1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.final, final.flatten(1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.pooled, ref.forward_head(final, pre_logits=True), atol=1e-5, rtol=0)
    assert set(backbone.frozen_state_dict()) == set(ref.state_dict())


def test_sites_widths_and_stage_selector():
    backbone = utuning.wrap(tiny_swin())
    specs = backbone.site_specs()
    assert backbone.stages == [range(0, 2), range(2, 4)] and backbone.num_layers == 4
    assert (specs["blocks.1"].dim, specs["blocks.2"].dim, specs["head"].dim) == (16, 32, 32)
    assert specs["blocks.1.attn"].info["shift"] == (2, 2) and specs["blocks.0.attn"].info["shift"] == (0, 0)
    assert specs["blocks.2.attn"].info["grid"] == (8, 8) and specs["blocks.2.attn"].num_heads == 4
    assert specs["blocks.2.downsample.reduction"].dim == 64 and "blocks.0.downsample.reduction" not in specs
    assert backbone.match("stages.1.attn") == ["blocks.2.attn", "blocks.3.attn"]
    assert backbone.match(["stages.{0..1}", "head"]) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert backbone.match("stages.*.mlp.fc1") == [f"blocks.{i}.mlp.fc1" for i in range(4)]
    with pytest.raises(utuning.SiteError, match="stage 2; this backbone has stages 0..1"):
        backbone.match("stages.2.attn")
    # Full fine-tuning of a stage's first block trains the patch merging that opens the stage.
    tuned = utuning.tune(backbone, [("full_finetune", "**")])
    assert {id(p) for p in tuned.trainable_parameters()} == {id(p) for p in backbone.model.parameters()}


def test_prefix_in_windows_exact_parallel_form(images):
    """Learned keys shared by every window, outside the position bias and the shift mask: the
    joint and the parallel form are the same attention (float64, 1e-10); so are prompt_parallel's."""
    ref = tiny_swin().double()
    x = images["pixel_values"].double()
    for name in ("prefix", "prompt_parallel"):
        outs, state = [], None
        for form in ("joint", "parallel"):
            tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [(name, "blocks.*.attn", {"tokens": 3, "form": form})])
            tuned.double().eval()
            if state is None:
                randomize_tuners(tuned, std=0.5)
                state = tuned.tuner_state_dict()
            tuned.load_tuner_state_dict(state)
            with torch.no_grad():
                outs.append(tuned(pixel_values=x))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0)
        assert not torch.allclose(outs[0], ref(x), atol=1e-4)


def test_prefix_keys_join_every_window_without_position_bias():
    """Window attention with a prefix equals a hand-written one: the learned keys/values join every
    window's keys; the relative position bias and the shift mask apply to the frozen keys only."""
    tuned = utuning.tune(utuning.wrap(tiny_swin()), [("prefix", "blocks.1.attn", {"tokens": 2})]).eval()
    randomize_tuners(tuned, std=0.5)
    block = tuned.backbone.model.layers[0].blocks[1]  # a shifted block: its mask is used
    a = block.attn
    pk, pv = (t[:, None] for t in tuned.backbone.slot("blocks.1.attn").tuners["prefix"](2, None))  # (B, 1, H, P, Dh)
    win = torch.randn(2, 16, 16, 16)  # (B, nW, Wa, C)
    with torch.no_grad():
        q, k, v = a.qkv(win).unflatten(-1, (3, a.num_heads, -1)).permute(3, 0, 1, 4, 2, 5)  # (B, nW, H, Wa, Dh)
        frozen = (q @ k.transpose(-2, -1)) * a.scale + a._get_rel_pos_bias() + block.attn_mask[:, None]
        probs = torch.cat([(q @ pk.transpose(-2, -1)) * a.scale, frozen], -1).softmax(-1)
        o = probs @ torch.cat([pv.expand(-1, 16, -1, -1, -1), v], -2)  # (B, nW, H, Wa, Dh)
        expected = a.proj(o.transpose(2, 3).flatten(3))
        torch.testing.assert_close(block._window_attention(win), expected, atol=1e-5, rtol=0)
        assert block.attn_mask.min() < 0  # the shift mask took part


def test_refusals_name_the_variant_and_the_reason():
    v2 = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32, patch_size=2, window_size=4,
                           embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5)
    with pytest.raises(utuning.UnsupportedModelError, match="SwinTransformerV2 is not supported.*post-norm"):
        SwinBackbone(v2)
    with pytest.raises(utuning.UnsupportedModelError, match="SwinTransformerV2 is not supported"):
        utuning.build_backbone("swin", model="swinv2_tiny_window8_256", img_size=32, patch_size=2, window_size=4,
                               embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    dynamic = tiny_swin(dynamic_img_size=True)
    with pytest.raises(utuning.UnsupportedModelError, match="dynamic_img_size"):
        SwinBackbone(dynamic)
    backbone = utuning.wrap(tiny_swin())
    with pytest.raises(utuning.PlacementError, match="windows.*prompt_parallel"):
        utuning.tune(backbone, [("vpt_deep", "blocks.*")])
    with pytest.raises(utuning.PlacementError, match="windows"):
        utuning.tune(backbone, [("prompt", "embed")])
    assert all(len(backbone.slot(s)) == 0 for s in backbone.site_names())


def test_compositions_on_the_hierarchy(images):
    ref = tiny_swin()
    for specs in ([("dual_u_tuner", "blocks.*", {"hidden": 4})], [("tri_u_tuner", "blocks.*", {"tuner": "p_prefix", "tokens": 2})],
                  [("houlsby_adapter", "blocks.*", {"hidden": 4})], [("convpass", "stages.1", {"hidden": 4})]):
        tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), specs).eval()
        with torch.no_grad():
            torch.testing.assert_close(tuned(**images), ref(images["pixel_values"]), atol=1e-6, rtol=0)
        assert_only_tuner_grads(tuned, images)
    widths = {r["site"]: r["parameters"] for r in utuning.tune(utuning.wrap(copy.deepcopy(ref)),
                                                               [("p_adapter", "blocks.*.mlp", {"hidden": 4})]).summary()}
    assert widths["blocks.0.mlp"] < widths["blocks.2.mlp"]  # per-site widths: 16 in stage 0, 32 in stage 1


def test_side_tuners_read_stage_outputs_and_cache(tmp_path, images):
    ref = tiny_swin()
    data = [(images["pixel_values"][i], i) for i in range(2)]
    for specs in ([("bypass", "stages.1", {"num_classes": 5, "hidden": 4, "pool": "mean"})],
                  [("ytuning", "stages.1", {"num_labels": 5, "hidden": 8, "heads": 2, "dropout": 0.0})]):
        tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), specs).eval()
        assert tuned.side_layers == [2, 3]
        cached = FeatureCache(tmp_path).dataset(tuned, data, batch_size=2)
        feats, _ = cached.collate([cached[0], cached[1]])
        assert feats.layers[3].shape == (2, 64, 32)
        with torch.no_grad():
            torch.testing.assert_close(tuned.side_forward(feats), tuned(**images), atol=1e-5, rtol=0)
        assert_only_tuner_grads(tuned, images)


def test_side_tuner_across_stages_of_different_widths(images):
    """Y-tuning projects each chosen block on its own width (stages of a hierarchical model differ), and
    learns from them; the bypass, whose side chain adds block outputs to each other, is refused by name."""
    model = tiny_swin()
    widths = {s.layer: s.dim for s in utuning.wrap(copy.deepcopy(model)).site_specs().values() if s.kind == "block"}
    assert widths[1] != widths[3]
    tuned = utuning.tune(utuning.wrap(model), [("ytuning", "blocks.{1,3}", {"num_labels": 5, "hidden": 8, "heads": 2})])
    out = tuned(**images)
    assert out.shape == (images["pixel_values"].shape[0], 5) and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in tuned.trainable_parameters())
    with pytest.raises(utuning.PlacementError, match=r"bypass chains the outputs of blocks of one width; .*stages.3"):
        utuning.tune(utuning.wrap(tiny_swin()), [("bypass", "blocks.{1,3}", {"num_classes": 5})])


def test_build_by_name_and_gradient_checkpointing(images):
    """``build_backbone("swin", ...)`` builds a timm model by name (offline, no weights); with
    gradient checkpointing the tuned outputs and the tuner gradients do not change."""
    backbone = utuning.build_backbone("swin", model="swin_tiny_patch4_window7_224", num_classes=5, img_size=32,
                                      patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    assert isinstance(backbone, SwinBackbone) and backbone.example_inputs(1)["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(utuning.UnknownNameError, match="swin_tiny_patch4_window7_224"):
        utuning.build_backbone("swin", model="swin_tiny_patch4_window7")
    tuned = utuning.tune(backbone, [("p_adapter", "stages.*.mlp", {"hidden": 4}),
                                    ("lora", "blocks.2.downsample.reduction", {"rank": 2})])
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


def test_composition_at_a_stage_stays_in_the_stage():
    tuned = utuning.tune(utuning.wrap(tiny_swin()), [("dual_u_tuner", "stages.1", {"hidden": 4})])
    assert [a.sites[0] for a in tuned.attached()] == ["blocks.2.attn", "blocks.2.mlp", "blocks.3.attn", "blocks.3.mlp"]
