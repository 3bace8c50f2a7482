"""timm Eva (EVA-02, RoPE ViTs) adapter, and the registry-driven tuner-zoo check shared by the
ViT-like families (``check_zoo_tuner``, also used by test_beit.py and test_hf_vision.py).

Every registered tuner (``utuning.TUNERS``) is attached at every site it fits; it must start as the
identity (unless listed in ``CHANGING``), train only its own parameters, change the outputs once its
weights move, survive a tuner state-dict round trip and merge exactly where it merges, or be refused
before anything is modified. A new tuner is covered without anyone editing these files.
"""

from __future__ import annotations

import collections
import copy
import inspect
from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import utuning
from tests.helpers import (  # noqa: F401 (one_thread: fixture)
    assert_only_tuner_grads,
    assert_state_round_trip,
    call,
    one_thread,
    randomize_tuners,
)
from utuning.backbones.eva import EvaBackbone
from utuning.cache import FeatureCache
from utuning.errors import PlacementError, UnsupportedModelError, UtuningError
from utuning.tuner import Tuner

pytestmark = pytest.mark.usefixtures("one_thread")

#: Small values for the zoo's common hyperparameters (zero init std: SSF starts as the identity).
SMALL_ARGS = {"hidden": 4, "tokens": 2, "rank": 2, "heads": 2, "init_std": 0.0}
#: Per-tuner arguments that make a method start as the identity where its paper default does not.
IDENTITY_ARGS = {"adapter_plus": {"init": "zero"}}
#: Site kinds a tuner is tried on where its kinds include sites whose operation may lack what it
#: needs (ln_tuning: an embed site without a LayerNorm, refused only once attached).
ZOO_AT = {"ln_tuning": ("block", "attn", "mlp", "norm")}
#: Methods that change the outputs from the start (inserted tokens, learned keys).
CHANGING = {"prompt", "prefix", "prompt_parallel", "loreft"}
ZOO = sorted(utuning.TUNERS)


def zoo_spec(backbone: utuning.Backbone, name: str) -> tuple[dict, list[str], list[str]]:
    """(args, sites the tuner fits, sites of its kinds that refuse it) from the registry and the sites."""
    cls = utuning.TUNERS.get(name)
    params = cls.hyperparameters()
    only = ZOO_AT.get(name)
    args = {k: v for k, v in SMALL_ARGS.items() if k in params} | IDENTITY_ARGS.get(name, {})
    for k in ("num_classes", "num_labels"):  # side tuners bring their own head; the others keep the model's
        if k in params and (params[k] is inspect.Parameter.empty or cls.placement == "side"):
            args[k] = 3
    fits, refused = [], []
    for site, spec in backbone.site_specs().items():
        if cls.placement == "side" and spec.kind != "block" or cls.site_kinds and spec.kind not in cls.site_kinds:
            continue
        if only is not None and spec.kind not in only:
            continue
        try:
            cls.check_site(spec)
            fits.append(site)
        except PlacementError:
            refused.append(site)
    return args, fits, refused


def _assert_refused(probe: utuning.Backbone, specs: list, match: str) -> None:
    """``tune`` raises a utuning error matching ``match`` and leaves the backbone as it was."""
    before = {k: v.clone() for k, v in probe.model.state_dict().items()}
    with pytest.raises(UtuningError, match=match):
        utuning.tune(probe, specs)
    assert all(len(slot) == 0 for slot in probe.slots.values()), "a refused tuner was left attached"
    assert all(torch.equal(v, before[k]) for k, v in probe.model.state_dict().items())


def check_zoo_tuner(name: str, make_backbone: Callable[[], utuning.Backbone],
                    reference: Callable[[dict], torch.Tensor], inputs: dict, atol: float = 1e-5,
                    refusals: dict[str, str] | None = None, changing: frozenset[str] = frozenset()) -> None:
    """The zoo contract for tuner ``name`` on a backbone family (see the module docstring).
    ``refusals``: tuner -> regex of the reason a family refuses it with when attached at every site it fits;
    ``changing``: tuners that cannot start as the identity on this family (e.g. a new head on an encoder)."""
    probe = make_backbone()
    args, fits, refused = zoo_spec(probe, name)
    cls = utuning.TUNERS.get(name)
    if name in (refusals or {}):
        _assert_refused(probe, [(name, fits or refused, args)], refusals[name])
        return
    if not fits:  # refused by every site of its kinds, or the family has no site of its kinds
        _assert_refused(probe, [(name, refused or "**", args)], refused[0].replace(".", r"\.") if refused else name)
        return
    keys = set(probe.model.state_dict())

    def make() -> utuning.TunedModel:
        return utuning.tune(make_backbone(), [(name, fits, args)])

    tuned = make().eval()
    assert set(tuned.backbone.model.state_dict()) == keys, "attaching tuners renamed frozen state-dict keys"
    with torch.no_grad():
        before = call(tuned, inputs)
        if cls.placement != "side" and name not in CHANGING | changing:
            torch.testing.assert_close(before, reference(inputs), atol=atol, rtol=0)
        randomize_tuners(tuned, std=0.2)
        after = call(tuned, inputs)
    assert tuned.trainable_parameters(), f"{name} trains nothing"
    assert not torch.allclose(after, before), f"moving {name}'s weights does not change the outputs"
    assert_only_tuner_grads(tuned, inputs)
    assert_state_round_trip(make, inputs)
    if cls.placement == "reparam" and type(tuned.attached()[0].tuner).merge is not Tuner.merge:
        tuned.eval()
        with torch.no_grad():
            try:
                tuned.merge()
            except PlacementError as e:  # e.g. BitFit on a layer without a bias: refused, all rolled back
                assert "bias" in str(e) and not any(a.tuner.merged for a in tuned.attached())
            torch.testing.assert_close(call(tuned, inputs), after, atol=atol, rtol=1e-4)
            tuned.unmerge()
            torch.testing.assert_close(call(tuned, inputs), after, atol=atol, rtol=1e-4)


def check_zoo_composition(name: str, make_backbone: Callable[[], utuning.Backbone],
                          reference: Callable[[dict], torch.Tensor], inputs: dict) -> None:
    """A registered composition (Dual-U-Tuner, VPT-deep...) at its default sites: it expands to tuners
    that start as the identity (unless one of them is in ``CHANGING``) and train only themselves."""
    at = inspect.signature(utuning.COMPOSITIONS.get(name)).parameters["at"].default
    tuned = utuning.tune(make_backbone(), [(name, at)]).eval()
    tuners = {a.tuner.name for a in tuned.attached()}
    if not tuners & CHANGING:
        with torch.no_grad():
            torch.testing.assert_close(call(tuned, inputs), reference(inputs), atol=1e-5, rtol=0)
    randomize_tuners(tuned, std=0.2)
    assert_only_tuner_grads(tuned, inputs)


def check_feature_cache(tuned: utuning.TunedModel, pixel_values: torch.Tensor, root) -> None:
    """Side tuners on cached features (built once, then hit) give the live outputs."""
    data = [(pixel_values[i], i % 3) for i in range(len(pixel_values))]
    cached = FeatureCache(root, shard_size=3).dataset(tuned, data, batch_size=2)
    hit = FeatureCache(root).dataset(tuned, data, batch_size=2)
    assert hit.key == cached.key and len(cached) == len(data)
    feats, target = cached.collate([cached[i] for i in range(len(data))])
    assert target.tolist() == [i % 3 for i in range(len(data))]
    tuned.eval()
    with torch.no_grad():
        live, again = tuned(pixel_values=pixel_values), tuned(features=feats)
    for key in live:
        torch.testing.assert_close(again[key], live[key], atol=1e-5, rtol=0)


class AtenOps(TorchDispatchMode):
    """Counts the aten operations a forward executes, by name and the shapes and strides of their tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = tuple((tuple(a.shape), a.stride()) for a in args if isinstance(a, torch.Tensor))
        self.ops[(str(func.overloadpacket), tensors)] += 1
        return func(*args, **(kwargs or {}))


def assert_same_aten_ops(reference: Callable[[], torch.Tensor], ours: Callable[[], torch.Tensor]) -> None:
    """The untuned adapter executes exactly the library forward's tensor operations (issue 12: untuned
    inference at <= 1.02 of the plain model): no extra copy, cat, bias add, mask or cast, and the same
    kernels on the same layouts; only Python-level dispatch may differ."""
    counts = []
    for forward in (reference, ours):
        with torch.inference_mode(), AtenOps() as mode:
            forward()
        counts.append(mode.ops)
    assert counts[0] - counts[1] == {} and counts[1] - counts[0] == {}, (
        f"only in the library's forward: {dict(counts[0] - counts[1])}; only in ours: {dict(counts[1] - counts[0])}")


# Tiny EVA models --------------------------------------------------------------------------------
#: name -> (timm model, overrides): EVA-02 Ti (fused qkv, packed SwiGLU, RoPE, abs pos), EVA-02 B-style
#: (separate q/k/v, SwiGLU with an FFN norm; here also scale norm in attention and register tokens),
#: RoPE-Axial ViT and RoPE-Mixed ViT.
CONFIGS = {
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 28, "patch_size": 7, "ref_feat_shape": (4, 4)}),
    "eva02_swiglu_reg": ("eva02_base_patch14_224", {"img_size": 28, "patch_size": 7, "ref_feat_shape": (4, 4),
                                                    "scale_attn_inner": True, "num_reg_tokens": 2}),
    "rope": ("vit_small_patch16_rope_224", {"img_size": 32, "patch_size": 8}),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {"img_size": 32, "patch_size": 8, "num_reg_tokens": 1,
                                                        "global_pool": "avg"}),
}


def tiny_eva(config: str = "eva02", seed: int = 0, **kwargs) -> nn.Module:
    """A 2-block, width-32 Eva built offline."""
    name, overrides = CONFIGS[config]
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, num_classes=5, embed_dim=32, depth=2, num_heads=2,
                          **{**overrides, **kwargs})
    return perturb(m).eval()


def perturb(m: nn.Module) -> nn.Module:
    """Draw the parameters timm starts at zero or tiny (split qkv biases, relative position tables, layer
    scales at 1e-5, the head at 1e-3 scale), so a re-written forward that dropped them would differ."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("q_bias", "v_bias", "relative_position_bias_table")) or n.startswith("head."):
                p.normal_(std=0.3)
            elif n.endswith(("gamma_1", "gamma_2")):
                p.uniform_(0.5, 1.5)
    return m


def images(model: nn.Module, batch: int = 2, dtype=torch.float32) -> dict:
    size = model.patch_embed.img_size
    return {"pixel_values": torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0), dtype=dtype)}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_no_tuner_equals_timm_and_intermediates(config):
    ref = tiny_eva(config)
    backbone = EvaBackbone(copy.deepcopy(ref)).eval()
    x = images(ref)
    assert ref.rope is not None and backbone.model.state_dict().keys() == ref.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(backbone(**x), ref(x["pixel_values"]), atol=1e-6, rtol=0)
        final, inter = ref.forward_intermediates(x["pixel_values"], indices=[0, 1], output_fmt="NLC")
        feats = backbone.intermediates(**x, layers=[0, 1])
    npt = ref.num_prefix_tokens
    for i in (0, 1):
        torch.testing.assert_close(feats.layers[i][:, npt:], inter[i], atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.final, final, atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.pooled, ref.forward_head(final, pre_logits=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_untuned_forward_runs_timms_operations(config):
    ref = tiny_eva(config)
    backbone, x = utuning.wrap(copy.deepcopy(ref)).eval(), images(ref)
    assert_same_aten_ops(lambda: ref(x["pixel_values"]), lambda: backbone(**x))
    # A LoRA merged into the fused qkv leaves the same operations; an unmerged one adds its own.
    lora = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("lora", "blocks.*.attn.q*", {"rank": 2})]).eval()
    randomize_tuners(lora)
    with pytest.raises(AssertionError, match="only in ours"):
        assert_same_aten_ops(lambda: ref(x["pixel_values"]), lambda: lora(**x))
    with torch.no_grad():
        out = lora(**x)
        lora.merge()
        torch.testing.assert_close(lora(**x), out, atol=1e-5, rtol=0)
    assert_same_aten_ops(lambda: ref(x["pixel_values"]), lambda: lora(**x))


@pytest.mark.parametrize("config", ["eva02", "eva02_swiglu_reg"])
def test_adaption_prompt_entries(config):
    """``out_proj`` is W_o (times gamma_1) applied to a change of the merged heads; it is offered only where
    W_o is linear in them (no head norm, ``scale_attn_inner``); ``raw_key_value`` skips norm1."""
    backbone = utuning.wrap(tiny_eva(config, init_values=1.0).double())  # with layer scale (gamma_1)
    spec, handle = backbone.site_specs()["blocks.1.attn"], backbone.slot("blocks.1.attn").handle
    block = backbone.model.blocks[1]
    tokens = torch.randn(2, 3, 32, dtype=torch.float64)
    k, v = handle.raw_key_value(tokens)
    a = block.attn
    if a.qkv is None:  # separate projections, each with its bias
        expected = a.v_proj(tokens)
    else:  # the fused layer and the bias timm keeps apart
        expected = torch.nn.functional.linear(tokens, a.qkv.weight, torch.cat((a.q_bias, a.k_bias, a.v_bias)))[..., 64:]
    torch.testing.assert_close(v, expected.view(2, 3, 2, 16).transpose(1, 2))  # (B, H, P, Dh)
    assert not torch.allclose(k, handle.key_value(tokens)[0])  # key_value applies norm1 first
    if config == "eva02_swiglu_reg":  # a LayerNorm over the heads before W_o
        assert "out_proj" not in spec.features
        with pytest.raises(PlacementError, match="out_proj.*project=False"):
            utuning.tune(backbone, [("adaption_prompt", "blocks.*.attn")])
        return
    heads, u = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(handle.out_proj(u), block.gamma_1 * (block.attn.proj(heads + u) - block.attn.proj(heads)))


#: EVA-02's SwiGLU FFN is 85 wide at width 32 (8/3 ratio): tuners needing a common divisor refuse it.
ODD_WIDTH = {"fact": "common width", "oft": "does not divide", "rep_adapter": "must divide"}


#: Known gaps of zoo tuners on these families (xfail, strict: fixing one makes the test fail).
GAPS: dict[str, str] = {}


#: The RoPE ViT (regular qkv bias, GELU MLP) and EVA-02 B (separate q/k/v, SwiGLU) run the tuners that read
#: or change their attention and linear layers.
SUBSET = ["bitfit", "full", "ia3", "lora", "p_prefix", "p_prompt", "prefix", "prompt", "prompt_parallel", "ssf"]


@pytest.mark.parametrize(("config", "name"), [("eva02", n) for n in ZOO]
                         + [(c, n) for c in ("rope", "eva02_swiglu_reg") for n in SUBSET if n in ZOO])
def test_zoo(config, name, request):
    if name in GAPS and config == "eva02":  # fused qkv with its bias kept apart
        request.applymarker(pytest.mark.xfail(strict=True, reason=GAPS[name]))
    ref = tiny_eva(config)
    check_zoo_tuner(name, lambda: utuning.wrap(copy.deepcopy(ref)), lambda i: ref(i["pixel_values"]), images(ref),
                    refusals=ODD_WIDTH if config == "eva02" else {})


@pytest.mark.parametrize("name", sorted(utuning.COMPOSITIONS))
def test_compositions(name):
    ref = tiny_eva("eva02_swiglu_reg")
    check_zoo_composition(name, lambda: utuning.wrap(copy.deepcopy(ref)), lambda i: ref(i["pixel_values"]), images(ref))


def _float64(config: str, specs: list) -> utuning.TunedModel:
    return utuning.tune(utuning.wrap(tiny_eva(config).double()), specs).double().eval()


@pytest.mark.parametrize("config", ["eva02_swiglu_reg", "rope_mixed"])
def test_prefix_joint_equals_parallel_and_prompt_equals_prompt_parallel(config):
    """U-Tuning's exact parallel form of prefix attention, and VPT-deep = prompt_parallel, with RoPE on
    the patches and none on learned keys or prompts (float64, 1e-10)."""
    x = images(tiny_eva(config), dtype=torch.float64)
    joint = _float64(config, [("prefix", "blocks.*.attn", {"tokens": 3})])
    randomize_tuners(joint, std=0.5)
    parallel = _float64(config, [("prefix", "blocks.*.attn", {"tokens": 3, "form": "parallel"})])
    parallel.load_tuner_state_dict(joint.tuner_state_dict())
    deep = _float64(config, [("prompt", "blocks.*", {"tokens": 3})])
    randomize_tuners(deep, std=0.5)
    par = _float64(config, [("prompt_parallel", "blocks.*.attn", {"tokens": 3})])
    par.load_tuner_state_dict({k.replace(".prompt.", ".attn.prompt_parallel."): v for k, v in deep.tuner_state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(parallel(**x), joint(**x), atol=1e-10, rtol=0)
        # Only the prompts' own outputs differ (dropped after each block), so compare the non-prompt tokens.
        a, b = deep.backbone.intermediates(**x, layers=[0, 1]), par.backbone.intermediates(**x, layers=[0, 1])
        for i in (0, 1):
            torch.testing.assert_close(a.layers[i], b.layers[i], atol=1e-10, rtol=0)
        torch.testing.assert_close(deep(**x), par(**x), atol=1e-10, rtol=0)
        assert not torch.allclose(deep(**x), tiny_eva(config).double()(x["pixel_values"]), atol=1e-4)


def test_p_prompt_query_is_rotated_like_the_block():
    """p_prompt's attention equals the prompt term (λ-part) of prompt_parallel: the frozen query the handle
    gives is the block's own rotated query; keys/values of prompts are not rotated."""
    backbone = utuning.wrap(tiny_eva("rope").double())
    handle, block = backbone.slot("blocks.1.attn").handle, backbone.model.blocks[1]
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    a = block.attn
    q, k, _ = a.qkv(block.norm1(x)).view(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    rope = backbone.model.rope.get_embed()
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    expected = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], rope, half=a.rotate_half)], dim=2)
    torch.testing.assert_close(handle.query(x), expected)
    torch.testing.assert_close(handle.key_value(x)[0], k)  # prompts: no rotation


def test_refusals_name_the_part_and_reason():
    dyn = tiny_eva("rope", dynamic_img_size=True)
    backbone = utuning.wrap(dyn)
    assert "query" not in backbone.site_specs()["blocks.0.attn"].features
    with pytest.raises(PlacementError, match="dynamic_img_size"):
        utuning.tune(backbone, [("p_prefix", "blocks.*.attn")])
    x = torch.randn(1, 3, 40, 48)  # another size: the RoPE grid follows it
    with torch.no_grad():
        torch.testing.assert_close(backbone(pixel_values=x), dyn(x), atol=1e-6, rtol=0)
    with pytest.raises(UnsupportedModelError, match="EvaBlockPostNorm"):
        EvaBackbone(timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, embed_dim=32,
                                      num_heads=2, img_size=28, patch_size=7, use_post_norm=True))
    with pytest.raises(UnsupportedModelError, match="grouped-query"):
        EvaBackbone(tiny_eva("rope", qkv_fused=False, num_kv_heads=1))
    # A layer lacking an attribute the re-written forward reads (as after a library change): refused by
    # name before any block is re-written.
    changed = tiny_eva("eva02")
    del changed.blocks[1].attn.q_norm
    with pytest.raises(UnsupportedModelError, match=r"blocks\.1\.attn.*lacks \['q_norm'\]"):
        EvaBackbone(changed)
    assert type(changed.blocks[0]).__name__ == "EvaBlock"


def test_split_qkv_bias_stays_outside_the_qkv_site():
    """timm keeps EVA's qkv bias in q_bias / k_bias / v_bias: the attn.qkv site is the bias-free layer, LoRA
    merges into it exactly and BitFit (which merges into a layer bias) is refused at merge, nothing changed."""
    tuned = utuning.tune(utuning.wrap(tiny_eva("eva02")), [("lora", "blocks.*.attn.qkv", {"rank": 2}),
                                                           ("bitfit", "blocks.*.attn.qkv")])
    randomize_tuners(tuned)
    a = tuned.backbone.model.blocks[0].attn
    assert a.qkv.bias is None and a.q_bias is not None
    assert torch.count_nonzero(a.q_bias) > 0
    x = images(tuned.backbone.model)
    weight = a.qkv.weight.clone()
    with torch.no_grad():
        out = tuned(**x)
        with pytest.raises(PlacementError, match="bitfit cannot merge.*no bias"):
            tuned.merge()
        torch.testing.assert_close(a.qkv.weight, weight)  # LoRA merged first, then rolled back
        assert not any(att.tuner.merged for att in tuned.attached())
        torch.testing.assert_close(tuned(**x), out, atol=1e-5, rtol=0)
    lora = utuning.tune(utuning.wrap(tiny_eva("eva02")), [("lora", "blocks.*.attn.qkv", {"rank": 2})]).eval()
    randomize_tuners(lora)
    with torch.no_grad():
        out = lora(**x)
        lora.merge()
        assert not torch.equal(lora.backbone.model.blocks[0].attn.qkv.weight, weight)
        torch.testing.assert_close(lora(**x), out, atol=1e-5, rtol=0)


def test_side_tuners_cache_and_wrap(tmp_path):
    ref = tiny_eva("eva02_swiglu_reg")
    assert isinstance(utuning.wrap(copy.deepcopy(ref)), EvaBackbone)
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("bypass", "blocks.*", {"num_classes": 3, "hidden": 4}),
                                                             ("ytuning", "blocks.*", {"num_labels": 3, "hidden": 8,
                                                                                      "heads": 2})])
    x = images(ref, batch=4)
    out = tuned(**x)
    assert set(out) == {"bypass", "ytuning"} and out["bypass"].shape == (4, 3)
    check_feature_cache(tuned, x["pixel_values"], tmp_path)
    backbone = utuning.build_backbone("eva", model="eva02_tiny_patch14_224", num_classes=4, img_size=28, patch_size=7,
                                      embed_dim=32, depth=1, num_heads=2)
    assert backbone(**backbone.example_inputs(1)).shape == (1, 4)
    with pytest.raises(utuning.UnknownNameError, match="eva02_tiny"):
        utuning.build_backbone("eva", model="eva02_tiny_patch14_22")


def test_grad_checkpointing_same_outputs_and_grads():
    results = []
    for enable in (False, True):
        tuned = utuning.tune(utuning.wrap(tiny_eva("rope_mixed")), [("prompt", "blocks.*", {"tokens": 2}),
                                                                   ("lora", "blocks.*.attn.qkv", {"rank": 2})]).eval()
        randomize_tuners(tuned)
        tuned.set_grad_checkpointing(enable)
        assert tuned.backbone.model.grad_checkpointing == enable
        out = tuned(**images(tuned.backbone.model))
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in tuned.named_trainable_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for k, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][k])


def test_site_names_follow_the_layers():
    """Fused qkv and packed SwiGLU (EVA-02 Ti), separate q/k/v and SwiGLU (EVA-02 B): one name per frozen linear."""
    fused = utuning.wrap(tiny_eva("eva02")).site_names()
    separate = utuning.wrap(tiny_eva("eva02_swiglu_reg")).site_names()
    assert [s for s in fused if s.startswith("blocks.0.")] == [
        "blocks.0.attn", "blocks.0.mlp", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert [s for s in separate if s.startswith("blocks.0.")] == [
        "blocks.0.attn", "blocks.0.mlp", "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.proj",
        "blocks.0.mlp.fc1_g", "blocks.0.mlp.fc1_x", "blocks.0.mlp.fc2"]
