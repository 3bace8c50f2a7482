"""Reparameterisation tuners (LoRA, SSF, BitFit) fold into the frozen linear layers exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import utuning
from tests.helpers import one_thread, randomize_tuners, tiny_vit  # noqa: F401 (one_thread: fixture)
from utuning.tuner import Tuner

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = {"atol": 1e-10, "rtol": 0}


class UnmergeableScale(Tuner):
    """A reparam tuner without ``merge`` (test only): ``y = y * w``."""

    placement = "reparam"
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2210.08823"

    def __init__(self, site, *, init: float = 1.0) -> None:
        super().__init__(site)
        self.w = nn.Parameter(torch.full((site.out_dim,), init))

    def forward(self, x: Tensor, y: Tensor, op) -> Tensor:
        return y * self.w

@pytest.fixture(scope="module", autouse=True)
def _register_unmergeablescale():
    """Registered for this module's tests only, so registry-wide checks elsewhere never see it."""
    with utuning.TUNERS.registered("test_unmergeable_scale", UnmergeableScale):
        yield



@pytest.fixture(scope="module")
def setup():
    ref = tiny_vit(depth=2).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    return ref, x


def _frozen(tuned):
    return {k: v.clone() for k, v in tuned.backbone.model.state_dict().items()}


SPECS = {
    "lora": [("lora", "blocks.*.attn.qkv", {"rank": 2, "parts": ["q", "v"]}), ("lora", "blocks.*.mlp.fc2", {"rank": 3})],
    "ssf": [("ssf", "blocks.*.*.*", {})],
    "bitfit": [("bitfit", "blocks.*.*.*", {})],
    "ia3": [("ia3", "blocks.*.attn.qkv", {"parts": ["k", "v"]}), ("ia3", "blocks.*.mlp.fc2", {"feedforward": True}),
            ("ia3", "blocks.*.mlp.fc1", {})],
    # Several reparam tuners on one layer: the merges compose in attachment order.
    "lora+ssf+bitfit": [("lora", "blocks.*.mlp.fc1", {"rank": 2}), ("ssf", "blocks.*.mlp.fc1", {}),
                        ("bitfit", "blocks.*.mlp.fc1", {}), ("p_adapter", "blocks.*.mlp", {"hidden": 4})],
}


@pytest.mark.parametrize("name", list(SPECS))
def test_merge_equals_unmerged_float64(setup, name):
    ref, x = setup
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), SPECS[name]).double().eval()
    randomize_tuners(tuned, std=0.3)
    frozen = _frozen(tuned)
    state = tuned.tuner_state_dict()
    with torch.no_grad():
        unmerged = tuned(pixel_values=x)
        tuned.merge()
        assert all(a.tuner.merged for a in tuned.attached() if a.tuner.placement == "reparam")
        merged = tuned(pixel_values=x)
        torch.testing.assert_close(merged, unmerged, **EXACT)
        changed = [k for k, v in tuned.backbone.model.state_dict().items() if not torch.equal(v, frozen[k])]
        assert changed and all(".attn.qkv." in k or ".mlp.fc" in k or ".attn.proj." in k for k in changed)
        # Merged: the frozen layers alone (tuners switched off) give the tuned outputs.
        tuned.merge()  # idempotent
        torch.testing.assert_close(tuned(pixel_values=x), unmerged, **EXACT)
        tuned.unmerge()
        torch.testing.assert_close(tuned(pixel_values=x), unmerged, **EXACT)
    for k, v in tuned.backbone.model.state_dict().items():
        torch.testing.assert_close(v, frozen[k], atol=1e-12, rtol=0)
    assert all(torch.equal(v, state[k]) for k, v in tuned.tuner_state_dict().items())


def test_load_while_merged_fails(setup):
    ref, _ = setup
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), SPECS["lora"]).double()
    state = tuned.tuner_state_dict()
    tuned.merge()
    with pytest.raises(utuning.StateDictError, match=r"Unmerge the tuners before loading"):
        tuned.load_tuner_state_dict(state)


def test_merge_of_unmergeable_tuner_fails_and_rolls_back(setup):
    ref, x = setup
    specs = [("lora", "blocks.*.attn.qkv", {"rank": 2}), ("test_unmergeable_scale", "blocks.1.mlp.fc1", {"init": 0.5})]
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), specs).double().eval()
    randomize_tuners(tuned)
    frozen = _frozen(tuned)
    with torch.no_grad():
        before = tuned(pixel_values=x)
        with pytest.raises(utuning.PlacementError, match=r"'test_unmergeable_scale' cannot be merged"):
            tuned.merge()
        assert not any(a.tuner.merged for a in tuned.attached())
        assert all(torch.equal(v, frozen[k]) for k, v in tuned.backbone.model.state_dict().items())
        torch.testing.assert_close(tuned(pixel_values=x), before, **EXACT)


def test_bias_free_layer_cannot_take_merged_bitfit():
    vit = tiny_vit(qkv_bias=False).double().eval()
    tuned = utuning.tune(utuning.wrap(vit), [("lora", "blocks.0.mlp.fc1", {}), ("bitfit", "blocks.0.attn.qkv", {})])
    randomize_tuners(tuned)
    frozen = _frozen(tuned)
    with pytest.raises(utuning.PlacementError, match=r"bitfit cannot merge into 'blocks.0.attn.qkv': .*no bias"):
        tuned.merge()
    for k, v in tuned.backbone.model.state_dict().items():  # rolled back (up to rounding)
        torch.testing.assert_close(v, frozen[k], atol=1e-12, rtol=0)


def test_merge_ignores_non_reparam_tuners(setup):
    ref, x = setup
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("p_adapter", "blocks.*.attn", {"hidden": 2})]).double()
    frozen = _frozen(tuned)
    tuned.merge()
    assert all(torch.equal(v, frozen[k]) for k, v in tuned.backbone.model.state_dict().items())


def test_ia3_equals_peft_ia3_on_the_same_timm_model():
    """Ours and HF PEFT's IA3 (all of the fused qkv outputs, as PEFT scales them; fc2 inputs)
    give the same outputs once the learned vectors are equal, and merge the same way."""
    peft = pytest.importorskip("peft")
    ref = tiny_vit(depth=2).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    config = peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"])
    theirs = peft.get_peft_model(copy.deepcopy(ref), config).double().eval()
    ours = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("ia3", "blocks.*.attn.qkv"),
                                                            ("ia3", "blocks.*.mlp.fc2", {"feedforward": True})]).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i in range(2):
            for site in (f"blocks.{i}.attn.qkv", f"blocks.{i}.mlp.fc2"):
                mine = next(a.tuner for a in ours.attached() if a.sites[0] == site)
                mine.scale.copy_(1 + 0.3 * torch.randn(mine.scale.shape, generator=g, dtype=torch.float64))
                module = theirs.base_model.model.get_submodule(site)
                module.ia3_l["default"].copy_(mine.scale.reshape(module.ia3_l["default"].shape))
        expected = theirs(x)
        torch.testing.assert_close(ours.eval()(pixel_values=x), expected, **EXACT)
        ours.merge()
        torch.testing.assert_close(ours(pixel_values=x), expected, **EXACT)
    n_ours = sum(p.numel() for p in ours.trainable_parameters())
    assert n_ours == sum(p.numel() for n, p in theirs.named_parameters() if "ia3_l" in n)


def test_fused_lora_equals_peft_lora_on_the_same_timm_model():
    """``fused: true`` is PEFT's LoRA on timm's fused qkv (one low-rank pair for the whole matrix):
    same parameter count, same outputs once the weights are equal, before and after merging."""
    peft = pytest.importorskip("peft")
    ref = tiny_vit(depth=2).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theirs = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]))
    theirs = theirs.double().eval()
    ours = utuning.tune(utuning.wrap(copy.deepcopy(ref)),
                        [("lora", "blocks.*.attn.qkv", {"rank": 4, "alpha": 8, "fused": True})]).double().eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i in range(2):
            mine = next(a.tuner for a in ours.attached() if a.sites[0] == f"blocks.{i}.attn.qkv")
            module = theirs.base_model.model.get_submodule(f"blocks.{i}.attn.qkv")
            mine.lora_B.normal_(generator=g)
            module.lora_A["default"].weight.copy_(mine.lora_A[0])
            module.lora_B["default"].weight.copy_(mine.lora_B[0])
        expected = theirs(x)
        torch.testing.assert_close(ours(pixel_values=x), expected, **EXACT)
        ours.merge()
        torch.testing.assert_close(ours(pixel_values=x), expected, **EXACT)
    n_theirs = sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in ours.trainable_parameters()) == n_theirs


@pytest.mark.parametrize("parts", [None, ["q", "v"], ["k"]])
def test_lora_on_fused_qkv_adapts_each_chosen_projection_separately(parts):
    """Per-part LoRA on a fused qkv equals LoRA on separate q/k/v layers: part p's output moves by
    (alpha/rank)·B_p A_p x and the parts not chosen do not move."""
    ref = tiny_vit(depth=1).double().eval()
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)),
                         [("lora", "blocks.0.attn.qkv", {"rank": 2, "alpha": 4, "parts": parts})]).double()
    lora = next(a.tuner for a in tuned.attached())
    with torch.no_grad():
        lora.lora_B.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 7, ref.embed_dim, dtype=torch.float64)
    y = torch.randn(5, 7, 3 * ref.embed_dim, dtype=torch.float64)
    out = lora(x, y, None)
    d = ref.embed_dim
    chosen = ["q", "k", "v"] if parts is None else parts
    for p, name in enumerate(("q", "k", "v")):
        moved = out[..., p * d:(p + 1) * d] - y[..., p * d:(p + 1) * d]
        if name in chosen:
            j = chosen.index(name) if parts is None else sorted(chosen, key="qkv".index).index(name)
            expected = 2.0 * x @ lora.lora_A[j].T @ lora.lora_B[j].T
            torch.testing.assert_close(moved, expected, **EXACT)
        else:
            assert torch.equal(moved, torch.zeros_like(moved))
    torch.testing.assert_close(lora.delta_weight() @ x[0].T, (out - y)[0].T, **EXACT)


def test_merge_refuses_a_non_finite_update_before_touching_the_weights():
    """The additive merges (LoRA, LoHa, LoKr, VeRA, FacT) compute the update in float32 or wider and
    check it first, as PEFT's safe_merge does."""
    tuned = utuning.tune(tiny_vit(), [("lora", "blocks.0.attn.qkv", {"rank": 2})])
    lora = tuned.attached()[0].tuner
    with torch.no_grad():
        lora.lora_B[0, 0, 0] = float("nan")  # a diverged tuner
    before = tuned.backbone.model.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(utuning.ConfigError, match="holds NaN or infinity; refusing to merge"):
        tuned.merge()
    assert torch.equal(tuned.backbone.model.blocks[0].attn.qkv.weight, before)
