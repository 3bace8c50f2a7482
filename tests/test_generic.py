"""The generic adapter on models no family adapter knows: a torchvision ResNet-18 (random
weights), a small conv + nn.TransformerEncoder model, and every registered tuner it accepts,
through the same behaviour checks as on ViT."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torchvision
from torch import nn

import utuning
from tests.helpers import assert_only_tuner_grads, assert_state_round_trip, call, randomize_tuners
from utuning.backbones.generic_sites import SiteModule
from utuning.tuner import Tuner

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


@pytest.fixture(scope="module")
def resnet():
    return _resnet()


RESNET_SPECS = [("conv_lora", "layer*.*.conv*", {"rank": 2}), ("p_adapter", "layer*.*", {"hidden": 4})]


def test_resnet_conv_lora_and_parallel_adapter_per_residual_block(resnet):
    """Frozen state-dict keys unchanged, identity at init, only tuner gradients, tuner keys that are
    module paths, a state-dict round trip, and conv-LoRA merged equal to unmerged."""
    keys = list(resnet.state_dict())
    make = lambda: utuning.tune(copy.deepcopy(resnet), RESNET_SPECS, backbone="generic", example_inputs=IMAGES)  # noqa: E731
    tuned = make().eval()
    assert list(tuned.backbone.model.state_dict()) == keys
    blocks = [s for s in tuned.backbone.site_specs().values() if s.kind == "block" and "." in s.name
              and s.name.count(".") == 1]
    assert [(s.name, s.dim, s.out_dim) for s in blocks][2:4] == [("layer2.0", 64, 128), ("layer2.1", 128, 128)]
    with torch.no_grad():
        want = resnet(IMAGES)
        torch.testing.assert_close(tuned(IMAGES), want, atol=1e-5, rtol=0)
        randomize_tuners(tuned, std=0.05)
        moved = tuned(IMAGES)
        assert not torch.allclose(moved, want, atol=1e-3)
    state = tuned.tuner_state_dict()
    assert "layer2.0.conv1.conv_lora.lora_A" in state and "layer2.0.p_adapter.bottleneck.down.weight" in state
    assert_only_tuner_grads(tuned, {"x": IMAGES})
    assert_state_round_trip(make, {"x": IMAGES})

    double = make().double().eval()
    randomize_tuners(double, std=0.05)
    x = IMAGES.double()
    with torch.no_grad():
        before = double(x)
        double.merge()
        torch.testing.assert_close(double(x), before, atol=1e-9, rtol=1e-9)
        double.unmerge()
        torch.testing.assert_close(double(x), before, atol=1e-9, rtol=1e-9)


def test_parallel_tuner_on_a_downsampling_block_reads_the_pooled_input(resnet):
    """On ``layer2.0`` (64x8x8 -> 128x4x4) a parallel tuner reads the input pooled to 4x4, as tokens."""
    tuned = utuning.tune(copy.deepcopy(resnet), [("p_adapter", "layer2.0", {"hidden": 4, "scale": "none"})],
                         backbone="generic", example_inputs=IMAGES).eval()
    randomize_tuners(tuned)
    site = tuned.backbone.model.layer2[0]
    tuner = tuned.backbone.slot("layer2.0").tuners["p_adapter"]
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        y = site.op(x)  # the frozen block
        u = tuner(torch.nn.functional.avg_pool2d(x, 2).flatten(2).transpose(1, 2), None)  # (B, 16, 128)
        torch.testing.assert_close(site(x), y + u.transpose(1, 2).reshape(y.shape), atol=1e-6, rtol=0)


def test_site_module_is_transparent(resnet):
    """A SiteModule shares the module's tables: dtype moves, train/eval, batch-norm statistics,
    load_state_dict from the original model, deepcopy and attribute access all act on the original."""
    backbone = utuning.wrap(copy.deepcopy(resnet), "generic", example_inputs=IMAGES)
    block = backbone.model.layer1[0]
    assert isinstance(block, SiteModule) and isinstance(block.op, torchvision.models.resnet.BasicBlock)
    assert block.conv1.out_channels == 64 and block.conv1.op.weight is block.conv1.weight
    backbone.train()
    assert block.op.training and block.bn1.training
    mean = block.bn1.running_mean.clone()
    backbone(IMAGES)
    assert not torch.equal(block.bn1.running_mean, mean)  # statistics move in training mode, as unwrapped
    backbone.eval()
    assert not block.op.training
    backbone.model.load_state_dict(resnet.state_dict())
    torch.testing.assert_close(backbone(IMAGES), resnet(IMAGES), atol=1e-5, rtol=0)
    backbone.double()
    assert block.conv1.op.weight.dtype == torch.float64 and block.op.bn1.running_var.dtype == torch.float64
    clone = copy.deepcopy(backbone)
    assert clone.model.layer1[0].op.conv1 is clone.model.layer1[0].conv1
    assert clone.model.layer1[0].conv1.op.weight is clone.model.layer1[0].conv1.weight
    assert clone.slot("layer1.0") is clone.model.layer1[0].slot


def test_refusals_name_the_reason(resnet):
    backbone = lambda **kw: utuning.wrap(copy.deepcopy(resnet), "generic", **kw)  # noqa: E731
    with pytest.raises(utuning.PlacementError, match="does not know where this module's attention is"):
        utuning.tune(backbone(example_inputs=IMAGES), [("prompt", "layer1.0", {"tokens": 2})])
    with pytest.raises(utuning.PlacementError, match="example_inputs"):
        utuning.tune(backbone(), [("p_adapter", "layer1.0", {"hidden": 4})])
    with pytest.raises(utuning.PlacementError, match="attaches to \\['linear'\\] sites, not to 'conv'"):
        utuning.tune(backbone(), [("lora", "layer1.0.conv1", {"rank": 2})])
    with pytest.raises(utuning.PlacementError, match="attaches to \\['conv'\\] sites, not to 'linear'"):
        utuning.tune(backbone(), [("conv_lora", "fc", {"rank": 2})])
    with pytest.raises(utuning.SiteError, match="Closest sites: \\['layer1.0.conv2', 'layer1.0.conv1'"):
        utuning.tune(backbone(), [("conv_lora", "layer1.0.conv9", {})])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(utuning.ConfigError, match="groups=2"):
        utuning.tune(grouped, [("conv_lora", "0", {})], backbone="generic")

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = nn.GRU(4, 4, batch_first=True)

        def forward(self, x):
            return self.pair(x)[0]

    with pytest.raises(utuning.PlacementError, match="it returns a tuple"):
        utuning.tune(TwoOutputs(), [("p_adapter", "pair", {})], backbone="generic",
                     example_inputs=torch.randn(2, 3, 4))
    class ReadsWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.lin.weight)

    with pytest.raises(utuning.PlacementError, match="the dry run never called this module"):
        utuning.tune(ReadsWeights(), [("lora", "lin", {})], backbone="generic", example_inputs=torch.randn(2, 4))
    class CalledTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(4, 4))

        def forward(self, x):
            return self.f(x) + self.f(x[:, :2]).sum(1, keepdim=True)

    with pytest.raises(utuning.PlacementError, match=r"called with different shapes \(\(2, 3, 4\) and \(2, 2, 4\)\)"):
        utuning.tune(CalledTwice(), [("p_adapter", "f", {})], backbone="generic", example_inputs=torch.randn(2, 3, 4))
    with pytest.raises(utuning.UnsupportedModelError, match="bare nn.MultiheadAttention"):
        utuning.wrap(nn.MultiheadAttention(8, 2), "generic")
    with pytest.raises(utuning.ConfigError, match="dry run of ResNet on example_inputs failed"):
        backbone(example_inputs=torch.randn(2, 5, 32, 32))
    with pytest.raises(utuning.ConfigError, match=r"takes no argument 'example_input'; did you mean \['example_inputs'"):
        backbone(example_input=IMAGES)
    with pytest.raises(utuning.UnsupportedModelError, match="No registered backbone adapter accepts a .*Linear"):
        utuning.wrap(nn.Linear(2, 2))


def test_wrap_falls_back_to_generic_with_a_warning(resnet):
    model = copy.deepcopy(resnet)
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match="wrapping it with the 'generic' adapter"):
        tuned = utuning.tune(model, [("lora", "fc", {"rank": 2})])
    assert tuned.backbone.name == "generic" and list(tuned.backbone.model.state_dict()) == keys


# Every registered tuner on a model with each kind of generic site ----------------------------
class Zoo(nn.Module):
    """Images -> conv stem -> residual conv block -> tokens -> linear -> position embedding ->
    2-layer nn.TransformerEncoder -> LayerNorm -> mean -> linear head: conv, block (maps and
    tokens), linear, embed, attn and norm sites."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.proj = nn.Linear(8, 32)
        self.pos = nn.Embedding(16, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 4, 4) -> (B, 3)
        h = self.stem(x)
        h = h + self.block(h)
        t = self.proj(h.flatten(2).transpose(1, 2)) + self.pos(torch.arange(16))  # (B, 16, 32)
        return self.head(self.norm(self.encoder(t)).mean(1))


ZOO_INPUT = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
# Values for required arguments, and small sizes, by argument name.
ARGS = {"num_classes": 3, "num_labels": 3, "rank": 2, "hidden": 4, "tokens": 2, "block_size": 4}
SIDE_SITES = "encoder.layers.*"
NOT_IDENTITY = {"prefix", "prompt_parallel", "ssf", "p_prompt", "loreft", "bypass", "ytuning", "lst"}  # start off the identity


def _zoo() -> nn.Module:
    torch.manual_seed(0)
    return Zoo().eval()


def _plan(name: str) -> tuple[list, str | None]:
    """The first site of the zoo model that takes this tuner, or why none does."""
    cls = utuning.TUNERS.get(name)
    args = {k: ARGS[k] for k in cls.hyperparameters() if k in ARGS}
    missing = [k for k, v in cls.hyperparameters().items() if v is inspect.Parameter.empty and k not in ARGS]
    assert not missing, f"add a test value for {name}'s required arguments {missing} to ARGS"
    if cls.placement == "side":
        return [(name, SIDE_SITES, args)], None
    reasons = []
    for site in utuning.wrap(_zoo(), "generic", example_inputs=ZOO_INPUT).site_specs().values():
        try:
            utuning.tune(_zoo(), [(name, site.name, args)], backbone="generic", example_inputs=ZOO_INPUT)
        except utuning.UtuningError as e:
            reasons.append(str(e))
            continue
        return [(name, site.name, args)], None
    return [], reasons[0] if reasons else "no site"


@pytest.mark.parametrize("name", [n for n in utuning.TUNERS])
def test_every_registered_tuner(name):
    """Each registered tuner either fits a site of the zoo model and passes the behaviour checks
    (identity at init unless the method starts elsewhere, outputs that move with its weights,
    gradients only for tuner parameters, a state-dict round trip, merge equality for mergeable
    tuners), or every site refuses it with a utuning error naming the reason."""
    specs, reason = _plan(name)
    if not specs:
        assert reason and ("cannot take" in reason or "attaches to" in reason or "needs" in reason
                           or "does not offer" in reason), reason
        return
    make = lambda: utuning.tune(_zoo(), specs, backbone="generic", example_inputs=ZOO_INPUT)  # noqa: E731
    reference = _zoo()
    tuned = make().eval()
    inputs = {"x": ZOO_INPUT}
    with torch.no_grad():
        before = call(tuned, inputs)
        if name not in NOT_IDENTITY and before.shape == reference(ZOO_INPUT).shape:
            torch.testing.assert_close(before, reference(ZOO_INPUT), atol=1e-5, rtol=0)
        randomize_tuners(tuned, std=0.2)
        after = call(tuned, inputs)
    assert tuned.trainable_parameters(), "the tuner trains nothing"
    assert not torch.allclose(after, before), "moving the tuner weights does not change the outputs"
    assert_only_tuner_grads(tuned, inputs)
    assert_state_round_trip(make, inputs)
    site = specs[0][1]
    assert all(k.startswith((f"{site}.", "side.", "shared.")) for k in tuned.tuner_state_dict())
    # Every tuner parameter is moved by a classification loss (float64: only rounding is zero), as on ViT.
    wide = make().double().train()
    randomize_tuners(wide, std=0.2)
    logits = call(wide, {"x": ZOO_INPUT.double()})
    torch.nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]) % logits.shape[1]).backward()
    grads = {n: 0.0 if p.grad is None else p.grad.abs().max().item() for n, p in wide.named_trainable_parameters()}
    dead = [n for n, g in grads.items() if not g > 1e-6 * max(grads.values())]
    assert not dead, dead
    if utuning.TUNERS.get(name).placement == "reparam" and utuning.TUNERS.get(name).merge is not Tuner.merge:
        tuned.eval()
        with torch.no_grad():
            unmerged = call(tuned, inputs)  # (batch-norm statistics moved in the training step)
            tuned.merge()
            torch.testing.assert_close(call(tuned, inputs), unmerged, atol=1e-5, rtol=1e-5)
            tuned.unmerge()
            torch.testing.assert_close(call(tuned, inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_build_from_a_recipe_entry():
    """``build_backbone("generic", model=<importable callable>, ...)``: what a recipe's backbone section
    builds; batches name their input (``pixel_values``)."""
    backbone = utuning.build_backbone("generic", model="torchvision.models.resnet18", num_classes=4, img_size=32)
    tuned = utuning.tune(backbone, [("conv_lora", "layer4.*.conv2", {"rank": 2}), ("full", "fc", {})])
    assert set(backbone.example_inputs()) == {"pixel_values"}
    assert tuned(**backbone.example_inputs()).shape == (2, 4)
    with pytest.raises(utuning.UnknownNameError, match="no callable 'resnet1800'. Did you mean \\['resnet18"):
        utuning.build_backbone("generic", model="torchvision.models.resnet1800", img_size=32)
    with pytest.raises(utuning.ConfigError, match="input_shape"):
        utuning.build_backbone("generic", model="torchvision.models.resnet18")
