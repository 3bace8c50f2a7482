"""The tuner zoo on a tiny timm ViT: one table of cases (``tests/tuner_cases.py``) through the shared helpers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import utuning
from tests.helpers import (  # noqa: F401 (one_thread: fixture)
    assert_identity,
    assert_only_tuner_grads,
    assert_state_round_trip,
    call,
    one_thread,
    randomize_tuners,
    tiny_vit,
)
from tests.tuner_cases import CASES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def _reference(**vit_kwargs):
    ref = tiny_vit(**vit_kwargs).eval()
    return ref, lambda inputs: ref(inputs["pixel_values"])


@pytest.mark.parametrize(("specs", "identity"), CASES)
def test_attach_train_and_reload(specs, identity, images):
    """Identity at init (where the method starts at zero), gradients only for tuner parameters,
    outputs that move once the tuner weights do, and a state-dict round trip."""
    ref, reference = _reference()
    make = lambda: utuning.tune(utuning.wrap(copy.deepcopy(ref)), specs)  # noqa: E731
    tuned = make().eval()
    with torch.no_grad():
        before = call(tuned, images)
        if identity:
            torch.testing.assert_close(before, reference(images), atol=1e-6, rtol=0)
        randomize_tuners(tuned, std=0.2)
        after = call(tuned, images)
    assert tuned.trainable_parameters(), "the tuner trains nothing"
    if after.shape == before.shape:
        assert not torch.allclose(after, before), "moving the tuner weights does not change the outputs"
    assert_only_tuner_grads(tuned, images)
    assert_state_round_trip(make, images)


@pytest.mark.parametrize(("specs", "identity"), CASES)
def test_every_tuner_parameter_is_moved_by_a_classification_loss(specs, identity, images):
    """No tuner parameter whose gradient is zero by construction (e.g. a bias that adds the same
    amount to every attention logit of a query, which the softmax removes): ``assert_only_tuner_grads``
    sees that a gradient exists, this checks it is not zero. float64, so that only rounding is zero."""
    tuned = utuning.tune(utuning.wrap(tiny_vit().double()), specs).double().train()
    randomize_tuners(tuned, std=0.2)
    logits = call(tuned, {"pixel_values": images["pixel_values"].double()})
    F.cross_entropy(logits, torch.arange(logits.shape[0]) % logits.shape[1]).backward()
    grads = {n: 0.0 if p.grad is None else p.grad.abs().max().item() for n, p in tuned.named_trainable_parameters()}
    dead = [n for n, g in grads.items() if not g > 1e-6 * max(grads.values())]
    assert not dead, dead


IDENTITY_CASES = [c for c in CASES if c.values[1]]


@pytest.mark.parametrize(("specs", "identity"), IDENTITY_CASES[::4])
@pytest.mark.parametrize("vit_kwargs", [{"reg_tokens": 4}, {"reg_tokens": 4, "global_pool": "avg"}],
                         ids=["reg4-token-pool", "reg4-avg-pool"])
def test_identity_with_register_tokens(specs, identity, vit_kwargs, images):
    ref, reference = _reference(**vit_kwargs)
    assert ref.num_prefix_tokens == 5
    assert_identity(lambda: utuning.wrap(copy.deepcopy(ref)), reference, specs, images)


def test_no_tuner_equals_timm(images):
    for kwargs in ({}, {"reg_tokens": 4}, {"class_token": False, "global_pool": "avg"}):
        ref, reference = _reference(**kwargs)
        assert_identity(lambda: utuning.wrap(copy.deepcopy(ref)), reference, [], images)  # noqa: B023


def test_prompt_shallow_embed_equals_block0_kept(images):
    """VPT-shallow: prompts at ``embed`` or at ``blocks.0`` with keep_outputs=True are the same model."""
    ref = tiny_vit(reg_tokens=2).eval()
    a = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("prompt", "embed", {"tokens": 4})]).eval()
    b = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("prompt", "blocks.0", {"tokens": 4, "keep_outputs": True})]).eval()
    b.load_tuner_state_dict({k.replace("embed.", "blocks.0."): v for k, v in a.tuner_state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(b(**images), a(**images), atol=1e-6, rtol=0)
        assert not torch.allclose(a(**images), ref(images["pixel_values"]))


def test_vpt_init_and_prompt_dropout():
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("prompt", "blocks.*", {"tokens": 50, "dropout": 0.5})])
    prompt = tuned.backbone.slot("blocks.0").tuners["prompt"]
    bound = (6.0 / (3 * 8 * 8 + 32)) ** 0.5  # VPT: uniform(-v, v), v = sqrt(6 / (3 * patch area + D))
    assert prompt.prompts.abs().max() <= bound and prompt.prompts.abs().max() > 0.8 * bound
    prompt.train()
    dropped = prompt(3, None)
    assert dropped.shape == (3, 50, 32) and (dropped == 0).float().mean() > 0.3
    prompt.eval()
    torch.testing.assert_close(prompt(3, None), prompt.prompts.expand(3, -1, -1))


def test_prompt_keep_and_remove_mixed(images):
    """Shallow (kept) prompts, deep (dropped) prompts and a kept prompt at a later block mix; the
    result equals a hand-written forward that inserts and removes the same tokens."""
    ref = tiny_vit(depth=3, reg_tokens=1).eval()
    specs = [("prompt", "embed", {"tokens": 2}), ("prompt", "blocks.*", {"tokens": 3}),
             ("prompt", "blocks.1", {"tokens": 1, "keep_outputs": True}),
             ("p_adapter", "blocks.1", {"hidden": 4})]
    with pytest.raises(utuning.PlacementError, match="attached twice at site 'blocks.1'"):
        utuning.tune(utuning.wrap(copy.deepcopy(ref)), specs)
    # One prompt tuner per site: keep at blocks.1 via its own spec, deep prompts at the others.
    specs[1] = ("prompt", "blocks.{0,2}", {"tokens": 3})
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), specs).eval()
    randomize_tuners(tuned)
    state = tuned.tuner_state_dict()
    shallow, deep0, kept1, deep2 = (state[f"{s}.prompt.prompts"] for s in ("embed", "blocks.0", "blocks.1", "blocks.2"))
    m = ref
    with torch.no_grad():
        x = m.norm_pre(m._pos_embed(m.patch_embed(images["pixel_values"])))
        ins = lambda x, p: torch.cat([x[:, :2], p.expand(x.shape[0], -1, -1), x[:, 2:]], 1)  # noqa: E731
        x = ins(x, shallow)
        x = m.blocks[0](ins(x, deep0))[:, [0, 1] + list(range(5, x.shape[1] + 3))]
        tuner = tuned.backbone.slot("blocks.1").tuners["p_adapter"]
        x = ins(x, kept1)
        x = m.blocks[1](x) + tuner(x, None)
        x = m.blocks[2](ins(x, deep2))[:, [0, 1] + list(range(5, x.shape[1] + 3))]
        x = torch.cat([x[:, :2], x[:, 5:]], 1)  # drop the 3 kept prompts (1 from blocks.1, 2 from embed)
        expected = m.forward_head(m.norm(x))
        torch.testing.assert_close(tuned(**images), expected, atol=1e-5, rtol=0)


def test_prefix_fold_keeps_outputs(images):
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("prefix", "blocks.*.attn", {"tokens": 3, "reparam_hidden": 8})])
    tuned.eval()
    randomize_tuners(tuned)
    with torch.no_grad():
        before = tuned(**images)
    keys_before = set(tuned.tuner_state_dict())
    for a in tuned.attached():
        a.tuner.fold()
    assert any("mlp" in k for k in keys_before)
    assert set(tuned.tuner_state_dict()) == {f"blocks.{i}.attn.prefix.{n}" for i in (0, 1) for n in ("key", "value")}
    assert all(p.requires_grad for p in tuned.trainable_parameters())
    with torch.no_grad():
        torch.testing.assert_close(tuned(**images), before, atol=1e-6, rtol=0)
    with pytest.raises(utuning.PlacementError, match="no MLP reparameterisation"):
        tuned.attached()[0].tuner.fold()


def test_compositions_expand_to_tuners():
    tuned = utuning.tune(utuning.wrap(tiny_vit()), [("houlsby_adapter", "blocks.*", {"hidden": 4}),
                                                    ("dual_u_tuner", "blocks.{1..1}", {"hidden": 4}),
                                                    ("linear_probe", "head")])
    rows = [(r["site"], r["tuner"]) for r in tuned.summary()]
    assert rows == [("blocks.0.attn", "adapter"), ("blocks.0.mlp", "adapter"), ("blocks.1.attn", "adapter"),
                    ("blocks.1.mlp", "adapter"), ("blocks.1.attn", "p_adapter"), ("blocks.1.mlp", "p_adapter"),
                    ("head", "linear_probe")]
    pf = utuning.tune(utuning.wrap(tiny_vit()), [("pfeiffer_adapter", "blocks.*")])
    assert [r["site"] for r in pf.summary()] == ["blocks.0.mlp", "blocks.1.mlp"]


#: Registered tuners that are no paper's method.
NO_PAPER = {"full": "full fine-tuning, the baseline every paper compares with"}


@pytest.mark.parametrize("name", list(utuning.TUNERS))
def test_every_registered_tuner_has_a_paper_and_keyword_only_args(name):
    cls = utuning.TUNERS.get(name)
    if name not in NO_PAPER:
        assert cls.paper.startswith("https://"), f"{name}: no paper link"
        ident = cls.paper.rstrip("/").rsplit("/", 1)[-1].removesuffix(".pdf")  # e.g. 2303.00690
        assert cls.__doc__ and (ident in cls.__doc__ or "arXiv" in cls.__doc__), f"{name}: the docstring cites no paper"
    for arg, default in cls.hyperparameters().items():
        assert default is not torch.nn.Parameter, arg


def test_paper_defaults():
    site = utuning.wrap(tiny_vit()).site_specs()
    assert utuning.TUNERS.get("p_adapter")(site=site["blocks.0.mlp"]).scale.kind == "channel"
    assert utuning.TUNERS.get("parallel_adapter")(site=site["blocks.0.mlp"]).scale == 0.1  # AdaptFormer s
    lora = utuning.TUNERS.get("lora")(site=site["blocks.0.attn.qkv"], parts=["q", "v"])
    assert lora.scaling == 1.0 and lora.index == [0, 2] and torch.count_nonzero(lora.lora_B) == 0
    ssf = utuning.TUNERS.get("ssf")(site=site["blocks.0.mlp.fc1"])
    assert 0.005 < ssf.scale.std() < 0.05 and abs(ssf.scale.mean() - 1) < 0.02
