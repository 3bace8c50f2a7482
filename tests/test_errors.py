"""Every user-facing error path: the error class, a message naming the value and the closest valid
choice, and (for attaching) a model left exactly as it was."""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
from torch import Tensor, nn

import utuning
from tests.helpers import one_thread, tiny_vit  # noqa: F401 (one_thread: fixture)
from utuning.tuner import Tuner

pytestmark = pytest.mark.usefixtures("one_thread")


class MlpOnly(Tuner):
    """A parallel tuner for FFN sites only, with a required argument (test only)."""

    placement = "parallel"
    site_kinds = frozenset({"mlp"})
    paper = "https://arxiv.org/abs/2303.00690"

    def __init__(self, site, *, width: int) -> None:
        super().__init__(site)
        self.w = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor, op) -> Tensor:
        return x * self.w.sum()

@pytest.fixture(scope="module", autouse=True)
def _register_mlponly():
    """Registered for this module's tests only, so registry-wide checks elsewhere never see it."""
    with utuning.TUNERS.registered("test_mlp_only", MlpOnly):
        yield



@pytest.fixture()
def vit():
    return tiny_vit()


def _untouched(backbone, ref, x):
    assert all(len(slot) == 0 for slot in backbone.slots.values())
    assert all(p.requires_grad for p in backbone.model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(pixel_values=x), ref.eval()(x), atol=0, rtol=0)


ATTACH_ERRORS = [
    pytest.param([("lorra", "blocks.*.attn.qkv")], utuning.UnknownNameError, r"Unknown tuner 'lorra'. Did you mean \['lora'",
                 id="unknown-tuner"),
    pytest.param([("lora", "blocks.*.atn.qkv")], utuning.SiteError,
                 r"pattern 'blocks.\*.atn.qkv' matches no site .*Closest sites: \['blocks.0.attn.qkv'", id="unknown-site"),
    pytest.param([("lora", "blocks.0.attn")], utuning.PlacementError,
                 r"'lora' needs placement 'reparam', which site 'blocks.0.attn' does not offer", id="placement"),
    pytest.param([("prefix", "blocks.0")], utuning.PlacementError, r"'prefix' needs placement 'prefix'.*'blocks.0'",
                 id="placement-prefix-on-block"),
    pytest.param([("prompt", "blocks.0.mlp")], utuning.PlacementError, r"'prompt' needs placement 'prompt'",
                 id="placement-prompt-on-mlp"),
    pytest.param([("test_mlp_only", "blocks.0.attn", {"width": 2})], utuning.PlacementError,
                 r"'test_mlp_only' attaches to \['mlp'\] sites, not to 'attn' site 'blocks.0.attn'", id="site-kind"),
    pytest.param([("lora", "blocks.0.attn.qkv", {"rnak": 4})], utuning.ConfigError,
                 r"'lora' has no argument 'rnak'. Did you mean \['rank'\]", id="bad-argument"),
    pytest.param([("test_mlp_only", "blocks.0.mlp")], utuning.ConfigError,
                 r"'test_mlp_only' needs argument\(s\) \['width'\]", id="missing-argument"),
    pytest.param([("lora", "blocks.0.attn.qkv"), ("lora", "blocks.*.attn.qkv")], utuning.PlacementError,
                 r"'lora' is attached twice at site 'blocks.0.attn.qkv'", id="duplicate"),
    pytest.param([("p_adapter", "blocks.*", {"scale": "chanel"})], utuning.ConfigError,
                 r"scale='chanel' is not one of .*did you mean \['channel'", id="bad-choice"),
    pytest.param([("prompt", "blocks.*", {"tokens": 0})], utuning.ConfigError, r"tokens=0 must be a number >= 1",
                 id="bad-number"),
    pytest.param([("lora", "blocks.0.mlp.fc1", {"parts": ["q"]})], utuning.ConfigError,
                 r"'parts' applies to fused qkv sites; 'blocks.0.mlp.fc1'", id="lora-parts-site"),
    pytest.param([("lora", "blocks.0.attn.qkv", {"parts": ["q", "x"]})], utuning.ConfigError,
                 r"must be a non-empty subset of \['q', 'k', 'v'\]", id="lora-parts-value"),
    pytest.param([("prompt", "embed", {"keep_outputs": False})], utuning.ConfigError,
                 r"prompt at 'embed' must keep its outputs", id="prompt-embed-dropped"),
    pytest.param([("lora", "blocks.{0..x}.attn.qkv")], utuning.SiteError, r"Bad layer range \{0..x\}", id="bad-range"),
    pytest.param([("lora", "blocks.{1..0}.attn.qkv")], utuning.SiteError, r"Bad layer range \{1..0\}: first > last",
                 id="reversed-range"),
    pytest.param([("lora", "")], utuning.SiteError, r"non-empty string", id="empty-pattern"),
    pytest.param([{"name": "lora", "atx": "blocks.*"}], utuning.ConfigError, r"unknown key 'atx'; did you mean \['at'\]",
                 id="spec-key"),
    pytest.param([("dual_u_tuner", "blocks.*", {"tuner": "p_adaptr"})], utuning.UnknownNameError,
                 r"Did you mean \['p_adapter'", id="composition-tuner"),
]


@pytest.mark.parametrize(("specs", "error", "match"), ATTACH_ERRORS)
def test_attach_errors_leave_the_model_untouched(vit, specs, error, match):
    ref = copy.deepcopy(vit)
    backbone = utuning.wrap(vit)
    x = torch.randn(2, 3, 32, 32)
    # A valid spec first: it must not be attached either when a later one fails.
    with pytest.raises(error, match=match):
        utuning.tune(backbone, [("p_adapter", "blocks.*.mlp"), *specs])
    _untouched(backbone, ref, x)


def test_strict_load_names_missing_unexpected_and_misshaped(vit):
    tuned = utuning.tune(utuning.wrap(vit), [("prefix", "blocks.*.attn", {"tokens": 2}), ("linear_probe", "head")])
    state = tuned.tuner_state_dict()
    before = {k: v.clone() for k, v in state.items()}
    bad = dict(state)
    del bad["blocks.0.attn.prefix.key"]
    bad["blocks.7.attn.prefix.key"] = torch.zeros(1)
    bad["blocks.1.attn.prefix.value"] = torch.zeros(1, 2, 3, 16)
    bad["head.linear_probe.fc.bias"] = torch.ones(10)
    with pytest.raises(utuning.StateDictError, match=(r"missing \['blocks.0.attn.prefix.key'\]; "
                                                      r"unexpected \['blocks.7.attn.prefix.key'\]; "
                                                      r"mis-shaped \['blocks.1.attn.prefix.value: checkpoint \(1, 2, 3, 16\) "
                                                      r"vs model \(1, 2, 2, 16\)'\]")):
        tuned.load_tuner_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in tuned.tuner_state_dict().items())  # nothing copied
    with pytest.raises(utuning.StateDictError, match=r"mis-shaped"):
        tuned.load_tuner_state_dict(bad, strict=False)
    del bad["blocks.1.attn.prefix.value"], bad["blocks.7.attn.prefix.key"]
    tuned.load_tuner_state_dict(bad, strict=False)  # missing entries keep their values
    assert torch.equal(tuned.tuner_state_dict()["head.linear_probe.fc.bias"], torch.ones(10))


REFUSED = [
    pytest.param({"block_fn": "ParallelScalingBlock"}, r"blocks.0 is a ParallelScalingBlock", id="parallel-scaling"),
    pytest.param({"block_fn": "ParallelThingsBlock"}, r"blocks.0 is a ParallelThingsBlock", id="parallel-things"),
    pytest.param({"block_fn": "ResPostBlock"}, r"blocks.0 is a ResPostBlock", id="post-norm"),
    pytest.param({"mlp_layer": "SwiGLUPacked"}, r"blocks.0.mlp is a GluMlp", id="swiglu-packed"),
    pytest.param({"mlp_layer": "SwiGLU"}, r"blocks.0.mlp is a SwiGLU", id="swiglu"),
    pytest.param({"attn_layer": "diff"}, r"blocks.0.attn is a DiffAttention", id="diff-attention"),
]


@pytest.mark.parametrize(("kwargs", "match"), REFUSED)
def test_refused_block_variants(kwargs, match):
    import timm.layers
    import timm.models.vision_transformer as vt

    resolved = {k: getattr(vt, v, None) or getattr(timm.layers, v, v) for k, v in kwargs.items()}
    model = tiny_vit(**resolved)
    before = [type(b) for b in model.blocks]
    with pytest.raises(utuning.UnsupportedModelError, match=match + r".* is not supported: "):
        utuning.wrap(model)
    assert [type(b) for b in model.blocks] == before  # refused before anything was re-written


def test_refused_gated_attention_and_extra_submodules():
    from timm.layers.attention import Attention

    if "gated" in inspect.signature(Attention).parameters:  # timm >= 1.0.28
        gated = functools.partial(Attention, gated=True)
        model = tiny_vit()
        model.blocks[1].attn = gated(32, num_heads=2, qkv_bias=True)
        with pytest.raises(utuning.UnsupportedModelError, match=r"blocks.1.attn is gated"):
            utuning.wrap(model)
    model = tiny_vit()
    model.blocks[0].extra = nn.Linear(2, 2)
    with pytest.raises(utuning.UnsupportedModelError, match=r"blocks.0 has extra submodules \['extra'\]"):
        utuning.wrap(model)


def test_other_errors(vit):
    with pytest.raises(utuning.UnsupportedModelError, match=r"No registered backbone adapter accepts a .*Linear"):
        utuning.wrap(nn.Linear(2, 2))
    backbone = utuning.wrap(vit)
    with pytest.raises(utuning.SiteError, match=r"no site 'blocks.0.atn'. Closest: \['blocks.0.attn'"):
        backbone.slot("blocks.0.atn")
    with pytest.raises(utuning.UnsupportedModelError, match=r"Masked or causal attention"):
        backbone.model.blocks[0](torch.randn(1, 17, 32), is_causal=True)
    with pytest.raises(utuning.UnknownNameError, match=r"Unknown timm model 'vit_bse_patch16_224'. Did you mean"):
        utuning.build_backbone("vit", model="vit_bse_patch16_224")
    with pytest.raises(utuning.UnknownNameError, match=r"Unknown backbone 'vitt'. Did you mean \['vit'"):
        utuning.build_backbone("vitt")
    with pytest.raises(utuning.ConfigError, match=r"lower_snake_case, got 'Bad-Name'"):
        utuning.register_tuner("Bad-Name")
    with pytest.raises(utuning.ConfigError, match=r"tuner 'lora' is already registered"):
        utuning.register_tuner("lora")(MlpOnly)
    tuned = utuning.tune(backbone, [("p_adapter", "blocks.0.mlp")])
    a = tuned.attached()[0]
    with pytest.raises(utuning.PlacementError, match=r"'p_adapter' cannot be merged"):
        a.tuner.merge(a.handle)
    with pytest.raises(utuning.ConfigError, match=r"Cannot read a tuner spec from 5"):
        utuning.TunerSpec.coerce(5)


def test_layer_range_partly_out_of_bounds_is_refused():
    """blocks.{0..11} on a 2-block model names blocks that do not exist: an error, not a silent subset."""
    from tests.helpers import vit_backbone
    from utuning.errors import SiteError

    backbone = vit_backbone()
    assert backbone.match("blocks.{0..1}.attn") == ["blocks.0.attn", "blocks.1.attn"]
    with pytest.raises(SiteError, match=r"asks for 'blocks.2.attn'.*Closest sites"):
        backbone.match("blocks.{0..11}.attn")


def test_a_library_release_without_an_attribute_is_refused_by_name():
    """A timm release whose Attention lacks an attribute the re-written forward reads is refused at
    wrap time, naming the attribute and the tested release (utuning.versions)."""
    model = tiny_vit()
    del model.blocks[1].attn.attn_dim  # as in timm < 1.0.23
    with pytest.raises(utuning.UnsupportedModelError, match=r"blocks.1.attn \(Attention\) has no attribute\(s\) "
                       r"\['attn_dim'\].*tested with timm 1.0.31"):
        utuning.wrap(model)


def test_a_tuner_that_needs_frozen_modules_the_site_lacks_is_refused_before_freezing():
    """``Tuner.check_handle`` runs in the plan: ln_tuning on a site without a LayerNorm fails with
    the model still untouched (nothing frozen, nothing attached)."""
    model = tiny_vit()
    with pytest.raises(utuning.PlacementError, match=r"ln_tuning at 'embed': the operation has no LayerNorm"):
        utuning.tune(model, [("ln_tuning", "embed", {})])
    assert all(p.requires_grad for p in model.parameters())
