"""timm Beit adapter: equivalence, relative position bias with prompts and prefixes, and the tuner zoo."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import utuning
from tests.helpers import call, one_thread, randomize_tuners  # noqa: F401 (one_thread: fixture)
from tests.test_eva import (
    GAPS,
    ZOO,
    assert_same_aten_ops,
    check_zoo_composition,
    check_zoo_tuner,
    images,
    perturb,
)
from utuning.backbones.beit import BeitBackbone, attend_with_bias, pad_bias
from utuning.errors import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")

#: name -> overrides of beit_base_patch16_224: per-block relative position bias with layer scale (BEiT),
#: and a shared bias plus absolute positions, average pooling and no layer scale.
CONFIGS = {
    "beit": {},
    "beit_shared": {"use_abs_pos_emb": True, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True,
                    "init_values": None, "global_pool": "avg"},
}


def tiny_beit(config: str = "beit", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                          embed_dim=32, depth=2, num_heads=2, **{**CONFIGS[config], **kwargs})
    return perturb(m).eval()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_no_tuner_equals_timm_and_intermediates(config):
    ref = tiny_beit(config)
    backbone = BeitBackbone(copy.deepcopy(ref)).eval()
    x = images(ref)
    assert backbone.model.state_dict().keys() == ref.state_dict().keys()
    tables = [n for n, p in ref.named_parameters() if n.endswith("relative_position_bias_table")]
    assert tables and all(ref.get_parameter(n).abs().sum() > 0 for n in tables)
    with torch.no_grad():
        torch.testing.assert_close(backbone(**x), ref(x["pixel_values"]), atol=1e-6, rtol=0)
        final, inter = ref.forward_intermediates(x["pixel_values"], indices=[0, 1], output_fmt="NLC")
        feats = backbone.intermediates(**x, layers=[0, 1])
    for i in (0, 1):
        torch.testing.assert_close(feats.layers[i][:, 1:], inter[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.final, final, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_untuned_forward_runs_timms_operations(config):
    """The same aten operations as timm's forward (bias gathered per block or shared, the qkv bias fused
    into one addmm, no padding or cast of the bias); a merged LoRA leaves them unchanged."""
    ref = tiny_beit(config)
    backbone, x = utuning.wrap(copy.deepcopy(ref)).eval(), images(ref)
    assert_same_aten_ops(lambda: ref(x["pixel_values"]), lambda: backbone(**x))
    lora = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("lora", "blocks.*.attn.qkv", {"rank": 2})]).eval()
    randomize_tuners(lora)
    lora.merge()
    assert_same_aten_ops(lambda: ref(x["pixel_values"]), lambda: lora(**x))


def test_adaption_prompt_entries():
    """BEiT's attention has no head norm: ``out_proj`` is gamma_1 · W_o on a change of the merged heads."""
    backbone = utuning.wrap(tiny_beit("beit").double())
    handle, block = backbone.slot("blocks.0.attn").handle, backbone.model.blocks[0]
    assert {"raw_key_value", "out_proj"} <= backbone.site_specs()["blocks.0.attn"].features
    heads, u = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(handle.out_proj(u), block.gamma_1 * (block.attn.proj(heads + u) - block.attn.proj(heads)))


@pytest.mark.parametrize("name", ZOO)
def test_zoo(name, request):
    if name in GAPS:  # BEiT's qkv keeps its bias apart, as EVA's
        request.applymarker(pytest.mark.xfail(strict=True, reason=GAPS[name]))
    ref = tiny_beit("beit")
    check_zoo_tuner(name, lambda: utuning.wrap(copy.deepcopy(ref)), lambda i: ref(i["pixel_values"]), images(ref))


@pytest.mark.parametrize("name", sorted(utuning.COMPOSITIONS))
def test_compositions(name):
    ref = tiny_beit("beit_shared")
    check_zoo_composition(name, lambda: utuning.wrap(copy.deepcopy(ref)), lambda i: ref(i["pixel_values"]), images(ref))


def test_pad_bias_puts_zeros_for_inserted_tokens():
    bias = torch.arange(1, 10.0).view(1, 1, 3, 3)  # class token + 2 patches
    padded = pad_bias(bias, 5, after=1)  # 2 prompts after the class token
    assert padded.shape == (1, 1, 5, 5)
    keep = [0, 3, 4]
    torch.testing.assert_close(padded[..., keep, :][..., keep], bias)
    assert padded[..., 1:3, :].abs().sum() == 0 and padded[..., :, 1:3].abs().sum() == 0


def test_attend_with_bias_parallel_form_float64():
    """(1 - λ)·Attn(Q, K, V; bias) + λ·Attn(Q, K_pre, V_pre) equals the joint attention, 1e-10."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=g) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=g)
    pre = [tuple(torch.randn(2, 2, 3, 4, dtype=torch.float64, generator=g) for _ in range(2))]
    joint = attend_with_bias(q, k, v, bias, prefixes=pre)
    torch.testing.assert_close(attend_with_bias(q, k, v, bias, prefixes=pre, decomposed=True), joint, atol=1e-10, rtol=0)
    logits = torch.cat([q @ pre[0][0].transpose(-1, -2) / 2, q @ k.transpose(-1, -2) / 2 + bias], -1)  # Dh = 4
    expected = logits.softmax(-1) @ torch.cat([pre[0][1], v], 2)
    torch.testing.assert_close(joint, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_prefix_parallel_form_and_prompt_equals_prompt_parallel(config):
    x = images(tiny_beit(config), dtype=torch.float64)

    def make(specs):
        return utuning.tune(utuning.wrap(tiny_beit(config).double()), specs).double().eval()

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
        assert not torch.allclose(deep(**x), tiny_beit(config).double()(x["pixel_values"]), atol=1e-4)


def test_side_tuners_wrap_create_and_refusal():
    ref = tiny_beit("beit_shared")
    backbone = utuning.wrap(copy.deepcopy(ref))
    assert isinstance(backbone, BeitBackbone)
    tuned = utuning.tune(backbone, [("bypass", "blocks.*", {"num_classes": 3, "hidden": 4})])
    x = images(ref)
    out = call(tuned, x)
    with torch.no_grad():
        torch.testing.assert_close(tuned(features=tuned.backbone.intermediates(**x, layers=[0, 1])), out.detach())
    built = utuning.build_backbone("beit", model="beit_base_patch16_224", num_classes=4, img_size=32, patch_size=8,
                                   embed_dim=32, depth=1, num_heads=2)
    assert built(**built.example_inputs(1)).shape == (1, 4)
    with pytest.raises(UnsupportedModelError, match="BeitTunedBlock"):
        BeitBackbone(backbone.model)  # already re-written: refused by name, nothing changed
