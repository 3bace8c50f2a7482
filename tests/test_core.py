"""Core behaviour: registries, site patterns, the frozen backbone, stable tuner state, training."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import utuning
from tests.helpers import assert_only_tuner_grads, call, one_thread, randomize_tuners, tiny_vit  # noqa: F401 (one_thread: fixture)
from utuning.sites import match_sites

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def test_one_registry_per_kind():
    assert utuning.TUNERS.kind == "tuner" and utuning.BACKBONES.kind == "backbone"
    assert utuning.COMPOSITIONS.kind == "composition"
    assert {"prompt", "prefix", "adapter", "parallel_adapter", "p_adapter", "p_prefix", "p_prompt", "lora",
            "bitfit", "ssf", "linear_probe", "full", "prompt_parallel"} <= set(utuning.TUNERS)
    assert {"dual_u_tuner", "tri_u_tuner", "houlsby_adapter", "pfeiffer_adapter"} <= set(utuning.COMPOSITIONS)
    assert "vit" in utuning.BACKBONES
    assert utuning.TUNERS.names("p_*") == ["p_adapter", "p_prefix", "p_prompt"]
    assert utuning.TUNERS.get("lora").name == "lora"


SITES = utuning.wrap(tiny_vit(depth=4)).site_names()


@pytest.mark.parametrize(("pattern", "expected"), [
    ("embed", ["embed"]),
    ("head", ["head"]),
    ("blocks.0", ["blocks.0"]),
    ("blocks.*", [f"blocks.{i}" for i in range(4)]),
    ("blocks.*.attn", [f"blocks.{i}.attn" for i in range(4)]),
    ("blocks.0.attn", ["blocks.0.attn"]),
    ("blocks.{0..1}.attn", ["blocks.0.attn", "blocks.1.attn"]),
    ("blocks.{1..3}.mlp", ["blocks.1.mlp", "blocks.2.mlp", "blocks.3.mlp"]),
    ("blocks.{0,3}", ["blocks.0", "blocks.3"]),
    ("blocks.2.attn.qkv", ["blocks.2.attn.qkv"]),
    ("blocks.3.*.*", ["blocks.3.attn.qkv", "blocks.3.attn.proj", "blocks.3.mlp.fc1", "blocks.3.mlp.fc2"]),
    ("blocks.1.mlp.fc?", ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]),
    ("blocks.0.**", ["blocks.0.attn", "blocks.0.mlp", "blocks.0.attn.qkv", "blocks.0.attn.proj",
                     "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]),
    (["blocks.1.attn.proj", "blocks.0.mlp"], ["blocks.0.mlp", "blocks.1.attn.proj"]),
])
def test_site_patterns(pattern, expected):
    assert match_sites(pattern, SITES) == expected


def test_site_names_and_kinds():
    specs = utuning.wrap(tiny_vit(depth=1)).site_specs()
    assert {n: s.kind for n, s in specs.items()} == {
        "embed": "embed", "blocks.0": "block", "blocks.0.attn": "attn", "blocks.0.mlp": "mlp",
        "blocks.0.attn.qkv": "linear", "blocks.0.attn.proj": "linear", "blocks.0.mlp.fc1": "linear",
        "blocks.0.mlp.fc2": "linear", "norm": "norm", "head": "head"}
    assert specs["blocks.0"].placements >= {"parallel", "sequential", "prompt"}
    assert "prefix" in specs["blocks.0.attn"].placements and "prompt" not in specs["blocks.0.attn"].placements
    assert specs["blocks.0.attn.qkv"].out_dim == 96 and specs["blocks.0.mlp.fc1"].out_dim == 128


def test_frozen_state_dict_keys_unchanged():
    original = tiny_vit(reg_tokens=2)
    keys = list(original.state_dict())
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(original)), [
        ("lora", "blocks.*.attn.qkv"), ("prefix", "blocks.*.attn"), ("p_adapter", "blocks.*"), ("linear_probe", "head")])
    assert list(tuned.backbone.model.state_dict()) == keys
    assert list(tuned.backbone.frozen_state_dict()) == keys
    fresh = tiny_vit(reg_tokens=2, seed=9)
    tuned.backbone.model.load_state_dict(fresh.state_dict(), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(tuned.backbone.model.state_dict()[k], v)


def test_backbone_frozen_and_trainables_by_walking_tuners(images):
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("p_adapter", "blocks.*.mlp", {"hidden": 3}), ("linear_probe", "head")])
    trainable = dict(tuned.named_trainable_parameters())
    assert sorted(trainable) == sorted(
        [f"blocks.{i}.mlp.p_adapter.{n}" for i in (0, 1)
         for n in ("bottleneck.down.weight", "bottleneck.down.bias", "bottleneck.up.weight", "bottleneck.up.bias",
                   "scale.weight")] + ["head.linear_probe.fc.weight", "head.linear_probe.fc.bias"])
    assert not any(p.requires_grad for p in tuned.backbone.model.parameters())
    randomize_tuners(tuned)
    assert_only_tuner_grads(tuned, images)


def test_summary_table():
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("lora", "blocks.*.attn.qkv", {"rank": 2}), ("linear_probe", "head")])
    rows = tuned.summary()
    assert [(r["site"], r["tuner"], r["placement"]) for r in rows] == [
        ("blocks.0.attn.qkv", "lora", "reparam"), ("blocks.1.attn.qkv", "lora", "reparam"), ("head", "linear_probe", "replace")]
    assert rows[0]["parameters"] == 3 * (2 * 32 + 32 * 2)
    text = tuned.format_summary()
    assert "blocks.1.attn.qkv" in text and "tunable" in text.splitlines()[-1]


class _Wrapper(nn.Module):
    """Stands in for DDP: holds the model as ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_state_keys_stable_under_wrappers():
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("prefix", "blocks.*.attn", {"tokens": 2}), ("linear_probe", "head")])
    keys = sorted(tuned.tuner_state_dict())
    assert keys == sorted([f"blocks.{i}.attn.prefix.{n}" for i in (0, 1) for n in ("key", "value")]
                          + ["head.linear_probe.fc.weight", "head.linear_probe.fc.bias"])
    assert utuning.unwrap(_Wrapper(_Wrapper(tuned))) is tuned
    compiled = torch.compile(tuned, backend="eager")
    assert utuning.unwrap(compiled) is tuned
    assert sorted(utuning.unwrap(compiled).tuner_state_dict()) == keys
    with pytest.raises(utuning.ConfigError, match="Linear does not wrap a TunedModel"):
        utuning.unwrap(nn.Linear(2, 2))


def test_mixed_methods_train(images):
    """Prompt + prefix + parallel adapter + LoRA + linear probe learn a fixed tiny problem with AdamW."""
    torch.manual_seed(0)
    tuned = utuning.tune(utuning.wrap(tiny_vit(num_classes=3)), [
        ("prompt", "blocks.*", {"tokens": 2}), ("prefix", "blocks.*.attn", {"tokens": 2}),
        ("parallel_adapter", "blocks.*.mlp", {"hidden": 8, "dropout": 0.0}),
        ("lora", "blocks.*.attn.qkv", {"rank": 2, "parts": ["q", "v"]}), ("linear_probe", "head")])
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    frozen = {k: v.clone() for k, v in tuned.backbone.model.state_dict().items()}
    tuned.train()
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(tuned(pixel_values=x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, frozen[k]) for k, v in tuned.backbone.model.state_dict().items())


@pytest.mark.parametrize("specs", [
    [("prompt", "blocks.*", {"tokens": 3}), ("prompt", "embed", {"tokens": 2})],
    [("prefix", "blocks.*.attn", {"tokens": 3, "reparam_hidden": 4}), ("p_adapter", "blocks.*", {"hidden": 4})],
    [("prompt_parallel", "blocks.*.attn", {"tokens": 3}), ("lora", "blocks.*.mlp.fc1", {"rank": 2})],
], ids=["prompts", "prefix", "prompt_parallel"])
def test_grad_checkpointing_same_outputs_and_grads(specs, images):
    tuned = utuning.tune(utuning.wrap(tiny_vit(depth=3)), specs)
    randomize_tuners(tuned)
    tuned.eval()

    def run():
        for p in tuned.parameters():
            p.grad = None
        out = call(tuned, images)
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tuned.named_trainable_parameters()}

    out, grads = run()
    tuned.set_grad_checkpointing(True)
    assert tuned.backbone.model.grad_checkpointing
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out, atol=1e-6, rtol=0)
    assert grads_ckpt.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_drop_path_drops_the_frozen_operation_not_the_parallel_tuner(images):
    """With stochastic depth at 1 every frozen residual branch is dropped in training; a parallel
    tuner beside the operation still contributes (AdaptFormer's placement)."""
    vit = tiny_vit(drop_path_rate=0.5)
    for blk in vit.blocks:
        blk.drop_path1 = timm.layers.DropPath(1.0)
        blk.drop_path2 = timm.layers.DropPath(1.0)
    plain = utuning.tune(utuning.wrap(copy.deepcopy(vit))).train()
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(vit)), [("p_adapter", "blocks.*.mlp", {"hidden": 4})]).train()
    randomize_tuners(tuned)
    with torch.no_grad():
        assert not torch.allclose(tuned(**images), plain(**images))
        tuned.eval()
        plain.eval()
        assert not torch.allclose(tuned(**images), plain(**images))


def test_float64_forward(images):
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("vpt_shallow", "embed"), ("p_prompt", "blocks.*.attn"),
                                                    ("p_prefix", "blocks.*.mlp"), ("lora", "blocks.*.attn.qkv")])
    tuned = tuned.double().eval()
    randomize_tuners(tuned)
    out = tuned(pixel_values=images["pixel_values"].double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
