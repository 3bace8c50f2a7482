"""Issue 14's vision and side methods against their papers' equations, and the memory of the
scaling tuners (saved-tensor bytes, deterministic)."""

from __future__ import annotations

import copy

import pytest
import torch

import utuning
from tests.helpers import call, one_thread, randomize_tuners, tiny_vit  # noqa: F401 (one_thread: fixture)
from utuning.tuners.bias_scale import scale_shift

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = {"pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
LINEARS = "blocks.*.*.*"


def saved_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(model.train(), inputs)
    return sum(kept.values())


def _tuned(specs):
    return utuning.tune(utuning.wrap(tiny_vit(depth=2)), specs)


@pytest.mark.parametrize(("scaling", "lora_at"), [
    ([("ssf", LINEARS, {})], LINEARS),
    ([("ia3", "blocks.*.attn.qkv", {"parts": ["k", "v"]}), ("ia3", "blocks.*.mlp.fc2", {"feedforward": True})],
     ["blocks.*.attn.qkv", "blocks.*.mlp.fc2"]),
], ids=["ssf", "ia3"])
def test_scaling_tuners_keep_no_more_for_backward_than_lora(scaling, lora_at):
    """Issue 14: SSF and IA3 train with no more memory than LoRA at a similar parameter count
    (rank 1 here: SSF 1152 vs LoRA 1152 parameters). Measured as the bytes of the tensors autograd
    saves, which is what training adds on top of the weights."""
    ours, lora = _tuned(scaling), _tuned([("lora", lora_at, {"rank": 1})])
    assert ours.num_parameters()[0] <= 1.2 * lora.num_parameters()[0]
    kept = saved_bytes(ours, IMAGES)
    assert kept <= saved_bytes(lora, IMAGES)
    assert kept < saved_bytes(_tuned([("full_finetune", "**", {})]), IMAGES)  # less than full fine-tuning


def test_scale_shift_keeps_the_output_only_and_has_exact_gradients():
    y = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    scale = (1 + 0.1 * torch.randn(6, dtype=torch.float64)).requires_grad_()
    shift = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scale_shift, (y, scale, shift))
    assert torch.autograd.gradcheck(scale_shift, (y, scale, None))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        z = scale_shift(y, scale, shift)
    big = [t for t in kept if t.numel() == y.numel()]
    assert len(big) == 1 and big[0].data_ptr() == z.data_ptr()  # z itself, not y


def test_rep_adapter_folds_into_the_next_layer_as_the_paper_writes():
    """RepAdapter (arXiv 2302.08106, Eq. 5-7): ``W (x + s(B(Ax + a) + b)) + c = W' x + c'`` with
    ``W' = W + s W B A`` and ``c' = c + s W (B a + b)``; B group-wise (block-diagonal)."""
    tuned = _tuned([("rep_adapter", "blocks.0.mlp.fc1", {"hidden": 4, "groups": 2, "scale": 0.7})]).double().eval()
    randomize_tuners(tuned, std=0.3)
    t = tuned.attached()[0].tuner
    up = t.up_matrix()
    assert up.shape == (32, 4) and torch.count_nonzero(up[:16, 2:]) == 0 and torch.count_nonzero(up[16:, :2]) == 0
    layer = tuned.backbone.model.blocks[0].mlp.fc1
    w, c = layer.weight.clone(), layer.bias.clone()
    tuned.merge()
    a, a_bias = t.down.weight, t.down.bias
    torch.testing.assert_close(layer.weight, w + 0.7 * w @ up @ a)
    torch.testing.assert_close(layer.bias, c + 0.7 * w @ (up @ a_bias + t.up_bias))
    tuned.unmerge()
    torch.testing.assert_close(layer.weight, w)


def test_glora_equation_on_a_layer_with_biases():
    """GLoRA (arXiv 2306.07967, Eq. 10) on a model whose frozen biases are not zero: every support
    gets a gradient, and the output equals ``(W + W⊙A + B) x + W C + b + b⊙D + E`` written out."""
    vit = tiny_vit().double()
    with torch.no_grad():
        for m in vit.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_(0, 0.5)
    tuned = utuning.tune(utuning.wrap(vit), [("glora", "blocks.0.mlp.fc1", {"rank": 2})]).double()
    randomize_tuners(tuned, std=0.3)
    g, layer = tuned.attached()[0].tuner, vit.blocks[0].mlp.fc1
    x = torch.randn(5, 32, dtype=torch.float64)
    w, b = layer.weight, layer.bias
    a, bb, c, d, e = g.A(), g.B(), g.C(), g.D(), g.E()
    expected = x @ (w + w * a + bb).T + (w @ c)[:, 0] + b + b * d[:, 0] + e[:, 0]
    torch.testing.assert_close(g(x, layer(x), tuned.backbone.slot("blocks.0.mlp.fc1").handle), expected)
    call(tuned, {"pixel_values": IMAGES["pixel_values"].double()}).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in tuned.trainable_parameters())


def test_adapter_plus_is_a_scaled_post_adapter():
    tuned = _tuned([("adapter_plus", "blocks.0.mlp", {"drop_path": 0.0})]).eval()
    t = tuned.attached()[0].tuner
    assert t.down.weight.abs().max() <= 0.02 and t.up.weight.abs().max() > 0  # Houlsby init: near identity
    assert torch.equal(t.scale, torch.ones(32))
    y = torch.randn(2, 5, 32)
    torch.testing.assert_close(t(y, None), t.up(torch.nn.functional.gelu(t.down(y))) * t.scale)


def test_difffit_composition_trains_biases_norms_and_scales():
    tuned = _tuned([("difffit", "blocks.*", {})])
    kinds = {(r["tuner"], r["placement"]) for r in tuned.summary()}
    assert kinds == {("difffit_scale", "sequential"), ("bitfit", "reparam"), ("ln_tuning", "unfreeze")}
    randomize_tuners(tuned, std=0.2)
    gamma = tuned.backbone.slot("blocks.0.attn").tuners["difffit_scale"].gamma
    y = torch.randn(2, 5, 32)
    torch.testing.assert_close(y + tuned.backbone.slot("blocks.0.attn").tuners["difffit_scale"](y, None), gamma * y)


def test_lst_trains_without_backbone_gradients_and_runs_on_cached_features():
    """LST (arXiv 2206.06522): no gradient reaches the backbone (it runs without autograd), and
    the side network gives the same outputs from precomputed features (the feature cache path)."""
    ref = tiny_vit(depth=3).eval()
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("lst", "blocks.*", {"num_classes": 10, "reduction": 4})])
    randomize_tuners(tuned, std=0.2)
    assert tuned.reads_features_only()
    kept = saved_bytes(tuned, IMAGES)
    out = call(tuned, IMAGES)
    out.pow(2).mean().backward()
    assert all(p.grad is None for p in tuned.backbone.parameters())
    lst = tuned.side["lst"]
    with torch.no_grad():
        feats = tuned.backbone.intermediates(**IMAGES, layers=tuned.side_layers)
    torch.testing.assert_close(tuned(features=feats), out.detach())
    gates = torch.sigmoid(lst.alpha / 0.1)
    assert gates.shape == (3,) and lst.up.in_features == 8
    # Side width 8 of 32: what autograd keeps is far below a tuner inside the backbone.
    inside = saved_bytes(utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("lora", LINEARS, {"rank": 1})]), IMAGES)
    assert kept < inside


def test_lst_gates_mix_the_ladder_as_the_paper_writes():
    """LST (arXiv 2206.06522, Sec. 3): the side input at block k is ``μ_k·down_k(f_k) +
    (1 − μ_k)·s_{k−1}``, ``μ_k = sigmoid(α_k / τ)``. A gate at one passes only the backbone feature
    (the side state below is cut off); a gate at zero passes only the side state (the block's
    feature is ignored)."""
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("lst", "blocks.*", {"num_classes": 10, "reduction": 4})]).eval()
    randomize_tuners(tuned, std=0.2)
    lst = tuned.side["lst"]
    with torch.no_grad():
        feats = tuned.backbone.intermediates(**IMAGES, layers=[0, 1])
        moved0 = copy.copy(feats)
        moved0.layers = {0: feats.layers[0] + torch.randn_like(feats.layers[0]), 1: feats.layers[1]}
        moved1 = copy.copy(feats)
        moved1.layers = {0: feats.layers[0], 1: feats.layers[1] + torch.randn_like(feats.layers[1])}
        lst.alpha[1] = 50.0  # μ_2 = 1: block 1's feature only
        torch.testing.assert_close(tuned(features=moved0), tuned(features=feats))
        assert not torch.allclose(tuned(features=moved1), tuned(features=feats))
        lst.alpha[1] = -50.0  # μ_2 = 0: the side state only
        torch.testing.assert_close(tuned(features=moved1), tuned(features=feats))
        assert not torch.allclose(tuned(features=moved0), tuned(features=feats))
