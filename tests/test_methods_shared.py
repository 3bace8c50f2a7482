"""State shared across sites (Tuner.shared_state): VeRA's frozen projections, FacT's factors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import VeraConfig, get_peft_model

import utuning
from tests.helpers import call, one_thread, randomize_tuners, tiny_vit  # noqa: F401 (one_thread: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
LINEARS = "blocks.*.*.*"
IMAGES = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def test_shared_state_is_one_module_saved_once_and_trained_by_every_site():
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("fact", LINEARS, {"rank": 4, "dropout": 0.0})])
    tuners = [a.tuner for a in tuned.attached()]
    assert len(tuners) == 8 and all(t.shared is tuned.shared["fact"] for t in tuners)
    state = tuned.tuner_state_dict()
    assert [k for k in state if k.startswith("shared.")] == ["shared.fact.u", "shared.fact.v"]
    names = dict(tuned.named_trainable_parameters())
    assert "shared.fact.u" in names and "shared.fact.v" in names
    assert tuned.summary()[-1]["site"] == "shared.fact (8 sites)"
    # Every site's update reaches u: its gradient is the sum of the sites' contributions.
    randomize_tuners(tuned)
    call(tuned, IMAGES).pow(2).mean().backward()
    full = tuned.shared["fact"].u.grad.clone()
    for t in tuners[1:]:  # the same loss with only the first site's V-path active
        t.scale = 0.0
    tuned.zero_grad()
    call(tuned, IMAGES).pow(2).mean().backward()
    assert not torch.allclose(tuned.shared["fact"].u.grad, full)


def test_shared_state_keys_and_errors():
    specs = [("vera", "blocks.*.attn.qkv", {"rank": 4}), ("vera", "blocks.*.mlp.fc1", {"rank": 4})]
    with pytest.raises(utuning.PlacementError, match="distinct 'key'"):
        utuning.tune(utuning.wrap(tiny_vit()), specs)
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [specs[0], {"name": "vera", "at": "blocks.*.mlp.fc1",
                                                               "args": {"rank": 2, "projection_seed": 1}, "key": "mlp"}])
    assert set(tuned.shared) == {"vera", "mlp"}
    assert tuned.shared["vera"].vera_A.shape == (4, 32) and tuned.shared["mlp"].vera_B.shape == (128, 2)
    site = utuning.wrap(tiny_vit()).site_specs()["blocks.0.attn.qkv"]
    lone = utuning.TUNERS.get("vera")(site=site, rank=4)
    with pytest.raises(utuning.PlacementError, match="shares state across sites"):
        lone.projections()
    # A state dict without the shared projections is refused by name.
    state = tuned.tuner_state_dict()
    del state["shared.mlp.vera_A"]
    with pytest.raises(utuning.StateDictError, match="shared.mlp.vera_A"):
        tuned.load_tuner_state_dict(state)


def test_vera_equals_peft_vera_on_a_timm_vit():
    """Same seed -> same frozen projections as PEFT; the same λ vectors -> the same outputs (1e-5)."""
    ref = tiny_vit().eval()
    peft_model = get_peft_model(copy.deepcopy(ref), VeraConfig(r=8, target_modules=["qkv", "fc1", "fc2"],
                                                               projection_prng_key=0)).eval()
    ours = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("vera", "blocks.*.{attn.qkv,mlp.fc1,mlp.fc2}",
                                                            {"rank": 8})]).eval()
    randomize_tuners(ours, std=0.3)
    peft_state = {}
    for k, v in ours.tuner_state_dict().items():
        if k.startswith("shared."):
            continue
        site, param = k.rsplit(".vera.", 1)
        peft_state[f"base_model.model.{site}.vera_{param}.default"] = v
    missing = peft_model.load_state_dict(peft_state, strict=False)
    assert not missing.unexpected_keys
    torch.testing.assert_close(ours.shared["vera"].vera_A, peft_model.base_model.vera_A["default"])
    torch.testing.assert_close(ours.shared["vera"].vera_B, peft_model.base_model.vera_B["default"])
    with torch.no_grad():
        torch.testing.assert_close(call(ours, IMAGES), peft_model(IMAGES["pixel_values"]), atol=1e-5, rtol=0)
        ours.merge()
        torch.testing.assert_close(call(ours, IMAGES), peft_model(IMAGES["pixel_values"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", ["tt", "tk"])
def test_fact_updates_follow_the_papers_factorisation(form):
    """FacT (arXiv 2212.03145, Sec. 3.2-3.3): each D x D chunk j of a layer changes by
    ``s · V M_j U`` with M_j the TT middle factor of that (output, input) block, or in the Tucker
    form ``M_j = Σ_k C[:, :, k] p[k, j]``; written out chunk by chunk here, against the merged weights."""
    tuned = utuning.tune(utuning.wrap(tiny_vit().double()), [("fact", LINEARS, {"rank": 4, "form": form, "scale": 0.5})])
    randomize_tuners(tuned.double(), std=0.3)
    f = tuned.shared["fact"]
    before = {k: v.clone() for k, v in tuned.backbone.frozen_state_dict().items()}
    tuned.merge()
    after = tuned.backbone.frozen_state_dict()
    d, r = 32, 4
    for a in tuned.attached():
        site, t = a.sites[0], a.tuner
        n_in, n_out = t.site.dim // d, t.site.out_dim // d
        delta = after[f"{site}.weight"] - before[f"{site}.weight"]  # (n_out·D, n_in·D)
        for o in range(n_out):
            for i in range(n_in):
                if form == "tt":
                    m = t.core[o * r:(o + 1) * r, i * r:(i + 1) * r]  # (r_out, r_in)
                else:
                    j = f.offsets[site] + o * n_in + i
                    m = torch.einsum("xyk,k->yx", f.core, f.p[:, j])  # (r_out, r_in)
                expected = 0.5 * f.v @ m @ f.u  # (D, D)
                torch.testing.assert_close(delta[o * d:(o + 1) * d, i * d:(i + 1) * d], expected, msg=f"{site} {o} {i}")
    # 12 chunks per layer, as the paper counts: q, k, v, proj, 4 of fc1, 4 of fc2.
    assert f.offsets == {"blocks.0.attn.qkv": 0, "blocks.0.attn.proj": 3, "blocks.0.mlp.fc1": 4, "blocks.0.mlp.fc2": 8,
                         "blocks.1.attn.qkv": 12, "blocks.1.attn.proj": 15, "blocks.1.mlp.fc1": 16, "blocks.1.mlp.fc2": 20}


def test_shared_state_and_scale_shift_compile_in_one_graph():
    """``torch.compile(fullgraph=True)`` traces tuners that read shared state (VeRA, FacT) and the
    custom autograd function of SSF: same outputs and gradients as eager."""
    torch._dynamo.reset()
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("vera", "blocks.*.mlp.fc1", {"rank": 4}),
                                                    ("fact", "blocks.*.attn.qkv", {"rank": 4, "form": "tk"}),
                                                    ("ssf", "blocks.*.mlp.fc2", {})]).eval()
    randomize_tuners(tuned)
    compiled = torch.compile(tuned, backend="aot_eager", fullgraph=True)

    def run(model):
        tuned.zero_grad()
        out = call(model, IMAGES)
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tuned.named_trainable_parameters()}

    (out_c, grads_c), (out_e, grads_e) = run(compiled), run(tuned)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    for n, g in grads_e.items():
        torch.testing.assert_close(grads_c[n], g, atol=1e-5, rtol=1e-5, msg=n)


def test_vera_equals_peft_vera_on_a_tiny_bert():
    from tests.text_helpers import padded_inputs, tiny_text_model

    hf = tiny_text_model("bert")
    peft_model = get_peft_model(copy.deepcopy(hf), VeraConfig(r=8, target_modules=["query", "value", "dense"],
                                                              projection_prng_key=0)).eval()
    at = ["blocks.*.attn.q", "blocks.*.attn.v", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]
    ours = utuning.tune(utuning.wrap(copy.deepcopy(hf)), [("vera", at, {"rank": 8})]).eval()
    randomize_tuners(ours, std=0.3)
    names = {"attn.q": "attention.self.query", "attn.v": "attention.self.value", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    state = {}
    for k, v in ours.tuner_state_dict().items():
        if not k.startswith("shared."):
            site, param = k.rsplit(".vera.", 1)
            _, i, part = site.split(".", 2)
            state[f"base_model.model.bert.encoder.layer.{i}.{names[part]}.vera_{param}.default"] = v
    result = peft_model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "vera_lambda" in k and "pooler" not in k]
    inputs = padded_inputs(ours.backbone)
    with torch.no_grad():
        torch.testing.assert_close(call(ours, inputs), peft_model(**inputs).logits, atol=1e-5, rtol=0)
        assert (call(ours, inputs) - hf(**inputs).logits).abs().max() > 1e-4  # the tuner does act (tiny logits)
