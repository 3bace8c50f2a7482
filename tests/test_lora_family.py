"""The LoRA family (DoRA, rsLoRA, PiSSA, OLoRA, LoHa, LoKr), OFT and LN tuning on a tiny timm ViT
and a tiny BERT: the behaviour checks of the vision tuner table, merge equality, and the
equations each method is defined by."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import utuning
from tests.helpers import (  # noqa: F401 (one_thread: fixture)
    assert_only_tuner_grads,
    assert_state_round_trip,
    call,
    one_thread,
    randomize_tuners,
    tiny_vit,
)
from tests.text_helpers import padded_inputs, tiny_text_model

pytestmark = pytest.mark.usefixtures("one_thread")
EXACT = {"atol": 1e-10, "rtol": 0}
QKV, FC = "blocks.*.attn.qkv", ["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]

CASES = {  # id -> specs; every one starts as the identity
    "dora-qkv-parts": [("dora", QKV, {"rank": 2, "parts": ["q", "v"]})],
    "dora-fc-rslora": [("dora", FC, {"rank": 2, "alpha": 4, "rslora": True})],
    "lora-rslora": [("lora", QKV, {"rank": 4, "alpha": 8, "rslora": True, "fused": True})],
    "lora-pissa": [("lora", FC, {"rank": 2, "init": "pissa"})],
    "lora-olora-parts": [("lora", QKV, {"rank": 2, "init": "olora", "parts": ["q", "v"]})],
    "dora-pissa": [("dora", "blocks.*.attn.proj", {"rank": 2, "init": "pissa"})],
    "loha": [("loha", [QKV, *FC], {"rank": 2, "alpha": 4})],
    "lokr": [("lokr", [QKV, "blocks.*.attn.proj"], {"rank": 2})],
    "lokr-decompose-both": [("lokr", FC, {"rank": 1, "decompose_both": True})],
    "oft-exact": [("oft", [QKV, "blocks.*.mlp.fc2"], {"block_size": 8})],
    "oft-neumann-shared": [("oft", QKV, {"block_size": 16, "cayley": "neumann", "block_share": True})],
    "ln_tuning": [("ln_tuning", ["blocks.*.attn", "blocks.*.mlp", "norm"], {})],
    "mix": [("dora", QKV, {"rank": 2}), ("oft", QKV, {"block_size": 8}), ("ln_tuning", "blocks.*.mlp", {}),
            ("loha", "blocks.*.mlp.fc1", {"rank": 2}), ("linear_probe", "head", {})],
}
MERGEABLE = [k for k in CASES if k not in ("ln_tuning", "mix")]


@pytest.fixture(scope="module")
def images():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("case", list(CASES))
def test_identity_gradients_and_reload(case, images):
    ref = tiny_vit().eval()
    make = lambda: utuning.tune(utuning.wrap(copy.deepcopy(ref)), CASES[case])  # noqa: E731
    tuned = make().eval()
    with torch.no_grad():
        torch.testing.assert_close(call(tuned, images), ref(images["pixel_values"]), atol=1e-5, rtol=0)
        randomize_tuners(tuned, std=0.2)
        assert not torch.allclose(call(tuned, images), ref(images["pixel_values"]), atol=1e-4)
    assert_only_tuner_grads(tuned, images)
    assert_state_round_trip(make, images)


@pytest.mark.parametrize("case", list(CASES))
def test_every_parameter_is_moved_by_a_classification_loss(case, images):
    tuned = utuning.tune(utuning.wrap(tiny_vit().double()), CASES[case]).double().train()
    randomize_tuners(tuned, std=0.2)
    logits = call(tuned, {"pixel_values": images["pixel_values"].double()})
    F.cross_entropy(logits, torch.arange(logits.shape[0]) % logits.shape[1]).backward()
    grads = {n: 0.0 if p.grad is None else p.grad.abs().max().item() for n, p in tuned.named_trainable_parameters()}
    dead = [n for n, g in grads.items() if not g > 1e-6 * max(grads.values())]
    assert not dead, dead


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_and_unmerge(case, images):
    ref = tiny_vit().double().eval()
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), CASES[case]).double().eval()
    randomize_tuners(tuned, std=0.2)
    x = images["pixel_values"].double()
    frozen = {k: v.clone() for k, v in tuned.backbone.model.state_dict().items()}
    with torch.no_grad():
        before = tuned(pixel_values=x)
        tuned.merge()
        assert any(not torch.equal(v, frozen[k]) for k, v in tuned.backbone.model.state_dict().items())
        torch.testing.assert_close(tuned(pixel_values=x), before, atol=1e-9, rtol=0)
        tuned.unmerge()
        for k, v in tuned.backbone.model.state_dict().items():
            torch.testing.assert_close(v, frozen[k], atol=1e-9, rtol=0)
        torch.testing.assert_close(tuned(pixel_values=x), before, **EXACT)


def test_text_encoder_family():
    """The same tuners on BERT's separate q/k/v, output and FFN layers and its post-LayerNorms."""
    hf = tiny_text_model("bert")
    inputs = padded_inputs(utuning.wrap(copy.deepcopy(hf)))
    specs = [("dora", "blocks.*.attn.{q,v}", {"rank": 2}), ("lokr", "blocks.*.mlp.fc1", {"rank": 2}),
             ("oft", "blocks.*.attn.proj", {"block_size": 8}), ("loha", "blocks.*.mlp.fc2", {"rank": 2}),
             ("lora", "blocks.*.attn.k", {"rank": 2, "init": "pissa"}),
             ("ln_tuning", ["embed", "blocks.*.attn", "blocks.*.mlp"], {})]
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(hf)), specs).eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(**inputs), hf(**inputs).logits, atol=1e-5, rtol=0)
    norms = [n for n, _ in tuned.named_trainable_parameters() if "ln_tuning" in n]
    assert len(norms) == 2 * (1 + 2 * 2)  # weight and bias of 5 LayerNorms
    assert_only_tuner_grads(tuned, inputs)


def _tuner(model, site):
    return next(a.tuner for a in model.attached() if a.sites[0] == site)


def test_dora_is_magnitude_times_direction():
    """W' = m ⊙ (W + sBA)/‖W + sBA‖_row, computed from the frozen layer; m starts at ‖W‖."""
    ref = tiny_vit(depth=1).double().eval()
    tuned = utuning.tune(utuning.wrap(ref), [("dora", "blocks.0.mlp.fc1", {"rank": 2, "alpha": 6})]).double()
    dora, layer = _tuner(tuned, "blocks.0.mlp.fc1"), ref.blocks[0].mlp.fc1
    torch.testing.assert_close(dora.magnitude, layer.weight.norm(dim=1), atol=1e-6, rtol=0)  # set in float32
    randomize_tuners(tuned)
    x = torch.randn(3, 32, dtype=torch.float64)
    w = layer.weight + 3.0 * dora.lora_B[0] @ dora.lora_A[0]
    expected = F.linear(x, dora.magnitude[:, None] * w / w.norm(dim=1, keepdim=True), layer.bias)
    torch.testing.assert_close(dora(x, layer(x), tuned.backbone.slot("blocks.0.mlp.fc1").handle), expected, **EXACT)


def test_rslora_scaling_and_principal_inits():
    site = utuning.wrap(tiny_vit()).site_specs()["blocks.0.mlp.fc1"]
    lora = utuning.TUNERS.get("lora")
    assert lora(site=site, rank=4, alpha=8, rslora=True).scaling == 4.0
    assert lora(site=site, rank=4, alpha=8).scaling == 2.0
    ref = tiny_vit(depth=1).double()
    w = ref.blocks[0].mlp.fc1.weight.detach().clone()
    for init in ("pissa", "olora"):
        tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)),
                             [("lora", "blocks.0.mlp.fc1", {"rank": 3, "alpha": 6, "init": init})]).double()
        t = _tuner(tuned, "blocks.0.mlp.fc1")
        principal = 2.0 * t.lora_B[0] @ t.lora_A[0]
        if init == "pissa":  # the best rank-3 approximation of W (Eckart-Young)
            u, s, vh = torch.linalg.svd(w)
            torch.testing.assert_close(principal, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-6, rtol=0)
        else:  # B0 has orthonormal columns, and B0 A0 are the first 3 columns of W's QR
            torch.testing.assert_close(t.lora_B[0].T @ t.lora_B[0], torch.eye(3, dtype=w.dtype), atol=1e-6, rtol=0)
        assert torch.equal(t.base_A, t.lora_A.detach()) and torch.equal(t.base_B, t.lora_B.detach())
        assert {"blocks.0.mlp.fc1.lora.base_A", "blocks.0.mlp.fc1.lora.base_B"} <= set(tuned.tuner_state_dict())
        torch.testing.assert_close(t.delta_weight(), torch.zeros_like(w), atol=1e-12, rtol=0)
        assert torch.equal(ref.blocks[0].mlp.fc1.weight, w)  # the frozen weight is never rewritten


def test_loha_and_lokr_equations():
    site = utuning.wrap(tiny_vit()).site_specs()["blocks.0.mlp.fc1"]  # (128, 32)
    loha = utuning.TUNERS.get("loha")(site=site, rank=2, alpha=4)
    torch.nn.init.normal_(loha.w2_b)
    expected = 2.0 * (loha.w1_a @ loha.w1_b) * (loha.w2_a @ loha.w2_b)
    torch.testing.assert_close(loha.delta_weight(), expected)
    assert torch.linalg.matrix_rank(loha.delta_weight().detach()) == 4  # rank r² from 4r(D_in+D_out)/2 numbers
    lokr = utuning.TUNERS.get("lokr")(site=site, rank=2)
    assert lokr.w1.shape == (8, 4) and lokr.w2_a.shape == (16, 2) and lokr.w2_b.shape == (2, 8)
    torch.nn.init.normal_(lokr.w1)
    w2 = lokr.w2_a @ lokr.w2_b
    d = lokr.delta_weight()
    torch.testing.assert_close(d[16:32, 8:16], 4.0 * lokr.w1[1, 1] * w2)  # block (1, 1) of (alpha/r)·W1 ⊗ W2


@pytest.mark.parametrize("cayley", ["exact", "neumann"])
def test_oft_rotation_is_block_diagonal(cayley):
    site = utuning.wrap(tiny_vit()).site_specs()["blocks.0.mlp.fc1"]
    oft = utuning.TUNERS.get("oft")(site=site, block_size=8, cayley=cayley, neumann_terms=6).double()
    torch.nn.init.normal_(oft.weight, std=0.05 if cayley == "neumann" else 0.5)
    r = oft.matrix()
    assert torch.count_nonzero(r[:8, 8:]) == 0 and r.shape == (32, 32)
    eye = torch.eye(32, dtype=r.dtype)
    tol = 1e-12 if cayley == "exact" else 1e-4  # the truncated series is only nearly orthogonal
    torch.testing.assert_close(r @ r.T, eye, atol=tol, rtol=0)
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(oft.reparam_input(x, None), x @ r, **EXACT)
    assert math.isclose(torch.linalg.det(r).item(), 1.0, abs_tol=1e-3)


def test_arguments_are_checked():
    with pytest.raises(utuning.ConfigError, match="block_size=7 does not divide"):
        utuning.tune(utuning.wrap(tiny_vit()), [("oft", QKV, {"block_size": 7})])
    with pytest.raises(utuning.ConfigError, match="init='svd' is not one of"):
        utuning.tune(utuning.wrap(tiny_vit()), [("dora", QKV, {"init": "svd"})])
    with pytest.raises(utuning.ConfigError, match="has no argument 'rnak'"):
        utuning.tune(utuning.wrap(tiny_vit()), [("dora", QKV, {"rnak": 2})])
    with pytest.raises(utuning.PlacementError, match="no LayerNorm to train"):
        utuning.tune(utuning.wrap(tiny_vit()), [("ln_tuning", "embed", {})])
