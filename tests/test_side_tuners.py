"""Side tuners (Y-Tuning, Res-Tuning-Bypass): outputs, heads, losses, a gradient-free backbone,
and one shared backbone pass for several side tuners."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import utuning
from tests.helpers import assert_only_tuner_grads, randomize_tuners, tiny_vit, vit_backbone
from utuning.backbone import Backbone, Features
from utuning.backbones.vit import ViTBackbone
from utuning.errors import ConfigError, PlacementError
from utuning.handle import OpHandle
from utuning.sites import SiteSpec
from utuning.tuners.ytuning import labelling_loss, separated_rows, span_loss


class CountingViT(ViTBackbone):
    """A ViT backbone that counts its ``intermediates`` calls."""

    calls = 0

    def intermediates(self, pixel_values, *, layers):
        self.calls += 1
        return super().intermediates(pixel_values, layers=layers)


class StubEmbedHandle(OpHandle):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__("embed", {"embedding": embedding})
        self.embedding = embedding

    def embed_text(self, names: list[str]) -> torch.Tensor:  # (L, D): mean of character embeddings
        ids = [torch.tensor([ord(c) % self.embedding.num_embeddings for c in n]) for n in names]
        return torch.stack([self.embedding(i).mean(0) for i in ids])


class StubText(Backbone):
    """A tiny text encoder with the text backbone contract (until backbones/hf_text.py lands):
    ``intermediates(input_ids, attention_mask, *, layers)`` with ``Features.mask`` (B, N) bool."""

    name = "stub_text"

    def __init__(self, dim: int = 16, depth: int = 2, vocab: int = 50) -> None:
        model = nn.ModuleDict({
            "embed": nn.Embedding(vocab, dim),
            "blocks": nn.ModuleList(nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
                                    for _ in range(depth)),
        })
        super().__init__(model)
        self.add_site(SiteSpec("embed", "embed", dim, frozenset({"unfreeze"})), StubEmbedHandle(model["embed"]))
        for i in range(depth):
            self.add_site(SiteSpec(f"blocks.{i}", "block", dim, frozenset({"unfreeze"}), layer=i, num_heads=2,
                                   head_dim=dim // 2), OpHandle(f"blocks.{i}"))

    def intermediates(self, input_ids, attention_mask, *, layers):
        x = self.model["embed"](input_ids)
        out = {}
        for i, block in enumerate(self.model["blocks"]):
            x = block(x, src_key_padding_mask=~attention_mask.bool())
            out[i] = x
        return Features({i: out[i] for i in layers}, x, x[:, 0], attention_mask.bool())


def text_inputs(b: int = 3, n: int = 7) -> dict:
    ids = torch.randint(1, 50, (b, n))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    return {"input_ids": ids, "attention_mask": mask}


def pixels(b: int = 2) -> dict:
    return {"pixel_values": torch.randn(b, 3, 32, 32)}


def test_ytuning_classification_on_vit_trains_only_the_side():
    tuned = utuning.tune(vit_backbone(depth=3), [("ytuning", "blocks.*", {"num_labels": 5, "dropout": 0.0})])
    out = tuned.eval()(**pixels())
    assert out.shape == (2, 5)
    assert tuned.side["ytuning"].layers == [0, 1, 2]
    assert_only_tuner_grads(tuned, pixels())
    assert all(p.grad is None for p in tuned.backbone.parameters())


@pytest.mark.parametrize("spec", [
    ("ytuning", "blocks.{1..2}", {"num_labels": 4, "fusion": "mixture", "depth": 1}),
    ("bypass", "blocks.*", {"num_classes": 4}),
    ("bypass", "blocks.*", {"num_classes": 4, "lateral": "prefix", "vertical": "prefix", "tokens": 3}),
])
def test_side_tuners_give_every_tuner_parameter_a_gradient(spec):
    tuned = utuning.tune(vit_backbone(depth=3), [spec])
    randomize_tuners(tuned)
    assert_only_tuner_grads(tuned, pixels())


def test_backbone_runs_without_autograd_graph():
    """No tensor of the backbone pass is saved for backward, and the output's graph reaches only
    tuner parameters: the saved tensors of ``model(x)`` are exactly those of ``side_forward``."""
    tuned = utuning.tune(vit_backbone(depth=2), [("bypass", "blocks.*", {"num_classes": 3})]).train()
    x = pixels()
    feats = tuned.backbone.intermediates(**x, layers=tuned.side_layers)
    assert not any(t.requires_grad for t in [*feats.layers.values(), feats.final, feats.pooled])

    def saved(fn):
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(tuple(t.shape)) or t, lambda t: t):
            out = fn()
        return out, count

    out, live = saved(lambda: tuned(**x))
    _, side = saved(lambda: tuned.side_forward(feats.detach()))
    assert live == side and len(live) > 0

    leaves, stack, seen = set(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    assert leaves and leaves <= {id(p) for p in tuned.trainable_parameters()}
    assert not leaves & {id(p) for p in tuned.backbone.parameters()}
    out.sum().backward()
    assert all(p.grad is None for p in tuned.backbone.parameters())


def test_bypass_starts_as_the_frozen_model():
    vit = tiny_vit(num_classes=6)
    x = pixels()
    with torch.no_grad():
        ref = vit.eval()(x["pixel_values"])
    tuned = utuning.tune(ViTBackbone(vit), [("bypass", "blocks.*", {"num_classes": 6})]).eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(**x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lateral", ["adapter", "prefix"])
def test_bypass_first_token_chain_equals_the_whole_chain(lateral):
    """With pool="first" the bypass runs its side chain on the first token only; that is exact
    because every Res-Tuner is token-wise: equal to the chain over all tokens, read at token 0."""
    tuned = utuning.tune(vit_backbone(depth=3), [("bypass", "blocks.*", {"num_classes": 3, "lateral": lateral,
                                                                      "vertical": lateral, "tokens": 2})]).eval()
    randomize_tuners(tuned)
    bypass = next(m for m in tuned.modules() if type(m).__name__ == "ResTuningBypass")
    x = pixels(3)
    with torch.no_grad():
        feats = tuned.backbone.intermediates(**x, layers=bypass.layers)
        h = bypass.lateral[0](feats.layers[bypass.layers[0]])  # (B, N, D): every token
        for lat, vert, i in zip(bypass.lateral[1:], bypass.vertical, bypass.layers[1:]):
            h = h + vert(h) + lat(feats.layers[i])
        assert h.shape[1] > 1
        torch.testing.assert_close(tuned(**x), bypass.head(feats.pooled + h[:, 0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_bypass_checkpointing_keeps_outputs_and_gradients_and_saves_less(dropout):
    """Recomputing the side chain in backward changes no number (dropout masks included) and keeps
    fewer bytes for backward than storing every Res-Tuner's activations."""
    results = {}
    for flag in (False, True):
        torch.manual_seed(0)
        tuned = utuning.tune(vit_backbone(depth=4), [("bypass", "blocks.*", {"num_classes": 3, "dropout": dropout,
                                                                          "checkpoint": flag})]).train()
        randomize_tuners(tuned)
        x = pixels(4)
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = tuned(**x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in tuned.named_parameters() if p.grad is not None}
        results[flag] = (out.detach(), grads, sum(saved))
    (out0, g0, bytes0), (out1, g1, bytes1) = results[False], results[True]
    torch.testing.assert_close(out1, out0, atol=1e-6, rtol=0)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5)
    assert bytes1 < 0.5 * bytes0


def test_two_side_tuners_share_one_backbone_pass():
    specs = [{"name": "ytuning", "at": "blocks.*", "args": {"num_labels": 3}, "key": "a"},
             {"name": "bypass", "at": "blocks.1", "args": {"num_classes": 4}, "key": "b"}]
    both = utuning.tune(CountingViT(tiny_vit()), specs).eval()
    randomize_tuners(both)
    x = pixels()
    with torch.no_grad():
        out = both(**x)
    assert both.backbone.calls == 1 and set(out) == {"a", "b"}
    for spec in specs:
        single = utuning.tune(CountingViT(tiny_vit()), [{**spec, "key": None}]).eval()
        only = next(iter(single.side.values()))
        only.load_state_dict(both.side[spec["key"]].state_dict())
        with torch.no_grad():
            torch.testing.assert_close(single(**x), out[spec["key"]])
        assert single.backbone.calls == 1


def test_key_padding_mask_is_respected_and_labelling_loss():
    torch.manual_seed(0)
    tuned = utuning.tune(StubText(), [("ytuning", "blocks.*", {"task": "labelling", "num_labels": 5})]).eval()
    x = text_inputs()
    with torch.no_grad():
        scores = tuned(**x)
        feats = tuned.backbone.intermediates(**x, layers=[0, 1])
        noisy = Features({i: t.masked_fill(~x["attention_mask"][..., None], 7.0) for i, t in feats.layers.items()},
                         feats.final, feats.pooled, feats.mask)
        again = tuned.side_forward(noisy)
    assert scores.shape == (3, 7, 5)
    real = x["attention_mask"]
    torch.testing.assert_close(again[real], scores[real])  # padding changes nothing at real tokens
    labels = torch.randint(0, 5, (3, 7)).masked_fill(~real, -100)
    expected = F.cross_entropy(scores[real], labels[real])
    torch.testing.assert_close(labelling_loss(scores, labels), expected)


def test_span_head_shapes_masking_and_loss():
    tuned = utuning.tune(StubText(), [("ytuning", "blocks.1", {"task": "span"})])
    x = text_inputs()
    logits = tuned(**x)
    assert logits.shape == (3, 7, 2)  # start scores [..., 0], end scores [..., 1]
    assert (logits[~x["attention_mask"]] == torch.finfo(logits.dtype).min).all()
    starts, ends = torch.tensor([0, 1, 1]), torch.tensor([3, 3, 1])
    loss = span_loss(logits, torch.stack([starts, ends], dim=1))
    expected = (F.cross_entropy(logits[..., 0], starts) + F.cross_entropy(logits[..., 1], ends)) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in tuned.backbone.parameters())


def test_classification_and_label_name_init_on_text():
    names = ["negative", "positive", "neutral"]
    tuned = utuning.tune(StubText(), [("ytuning", "blocks.*", {"label_names": names})])
    embed = tuned.backbone.slot("embed").handle
    with torch.no_grad():
        torch.testing.assert_close(tuned.side["ytuning"].labels, separated_rows(embed.embed_text(names)))
    assert tuned(**text_inputs()).shape == (3, 3)
    off = utuning.tune(StubText(), [("ytuning", "blocks.*", {"label_names": names, "name_init": False})])
    gram = off.side["ytuning"].labels @ off.side["ytuning"].labels.T / 16  # orthonormal start, scaled
    # centred orthonormal rows: a regular simplex, every pair at cosine -1/(L-1)
    torch.testing.assert_close(gram, torch.eye(3) * 1.5 - 0.5, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec, error, match", [
    (("ytuning", "blocks.*.attn", {"num_labels": 2}), PlacementError, "whole blocks"),
    (("ytuning", "blocks.*", {}), ConfigError, "num_labels or label_names"),
    (("ytuning", "blocks.*", {"task": "span", "num_labels": 3}), ConfigError, "exactly two labels"),
    (("ytuning", "blocks.*", {"num_labels": 2, "depth": 5}), ConfigError, "one decoder layer per chosen block"),
    (("ytuning", "blocks.*", {"num_labels": 2, "task": "classify"}), ConfigError, "did you mean"),
    (("ytuning", "blocks.*", {"label_names": ["a", "b"], "name_init": True}), ConfigError, "embed_text"),
    (("bypass", "blocks.*", {"num_classes": 2, "lateral": "lora"}), ConfigError, "lateral='lora'"),
    (("bypass", "blocks.*", {}), ConfigError, "num_classes"),
])
def test_side_tuner_errors(spec, error, match):
    with pytest.raises(error, match=match):
        utuning.tune(vit_backbone(), [spec])


class CharTokenizer:
    """A stand-in tokenizer (offline): one id per character."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [5 + ord(c) % 50 for c in text]}


@pytest.mark.parametrize("spec", [
    ("ytuning", "blocks.*", {"label_names": ["negative", "positive", "neutral"]}),
    ("ytuning", "blocks.*", {"task": "labelling", "num_labels": 4, "fusion": "mixture"}),
    ("ytuning", "blocks.1", {"task": "span"}),
    ("bypass", "blocks.*", {"num_classes": 3, "pool": "mean"}),
])
def test_side_tuners_on_a_tiny_bert(spec):
    from tests.text_helpers import extra_padding, padded_inputs, tiny_text_model
    from utuning.backbones.hf_text import HFTextBackbone

    backbone = HFTextBackbone(tiny_text_model("bert"), tokenizer=CharTokenizer())
    tuned = utuning.tune(backbone, [spec]).eval()
    side = next(iter(tuned.side.values()))
    if "label_names" in spec[2]:
        embed = backbone.slot("embed").handle
        torch.testing.assert_close(side.labels.detach(), separated_rows(embed.embed_text(spec[2]["label_names"])))
    x = padded_inputs(backbone)
    real = x["attention_mask"].bool()
    out = tuned(**x)
    b, n = real.shape
    shapes = {"classification": (b, 3), "labelling": (b, n, 4)}
    if getattr(side, "task", None) == "span":
        assert out.shape == (b, n, 2) and (out[~real] == torch.finfo(out.dtype).min).all()
        loss = span_loss(out, torch.tensor([[0, 1]] * b))
    else:
        assert out.shape == shapes.get(getattr(side, "task", "classification"))
        loss = out.float().pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in tuned.backbone.parameters())
    assert all(p.grad is not None for p in tuned.trainable_parameters())
    # Longer padding changes nothing: the key padding mask is respected.
    with torch.no_grad():
        longer = tuned(**extra_padding(x, 0))
    first, second = out, longer
    if first.shape[:2] == (b, n):  # per-token outputs: compare the real tokens
        first, second = first[real], second[:, :n][real]
    torch.testing.assert_close(second, first.detach(), atol=1e-5, rtol=1e-5)


def test_head_tuners_beside_side_tuners_are_refused():
    import utuning
    from tests.helpers import vit_backbone

    backbone = vit_backbone()
    with pytest.raises(utuning.PlacementError, match="would never run"):
        utuning.tune(backbone, [{"name": "ytuning", "at": "blocks.*", "args": {"num_labels": 3}},
                                {"name": "linear_probe", "at": "head"}])
    assert all(len(s) == 0 for s in backbone.slots.values())


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_vit_features_equal_timms_intermediates_on_an_untuned_model(reg_tokens):
    vit = tiny_vit(reg_tokens=reg_tokens).eval()
    x = pixels()["pixel_values"]
    with torch.no_grad():
        final, inter = vit.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, norm=False,
                                                 output_fmt="NLC")
        feats = ViTBackbone(tiny_vit(reg_tokens=reg_tokens)).eval().intermediates(x, layers=[0, 1])
    for i, (spatial, prefix) in enumerate(inter):
        torch.testing.assert_close(feats.layers[i], torch.cat([prefix, spatial], dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.final, final, atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.pooled, vit.forward_head(final, pre_logits=True), atol=1e-6, rtol=0)


def test_side_tuners_read_features_shaped_by_tuners_inside_the_backbone():
    """VPT-shallow prompts at ``embed`` (kept through every block) and an adapter in a block change
    what a bypass reads; the features keep the image's token count (prompts stripped)."""
    x = pixels()["pixel_values"]
    plain = utuning.tune(ViTBackbone(tiny_vit()), [("bypass", "blocks.*", {"num_classes": 10})]).eval()
    mixed = utuning.tune(ViTBackbone(tiny_vit()), [("vpt_shallow", "embed", {"tokens": 3}),
                                                    ("bypass", "blocks.*", {"num_classes": 10})]).eval()
    with torch.no_grad():
        a = plain.backbone.intermediates(x, layers=[0, 1])
        b = mixed.backbone.intermediates(x, layers=[0, 1])
        assert b.layers[1].shape == a.layers[1].shape and b.final.shape == a.final.shape
        assert not torch.allclose(b.layers[1], a.layers[1]) and not torch.allclose(b.pooled, a.pooled)
        torch.testing.assert_close(b.pooled, mixed.backbone.model.forward_head(b.final, pre_logits=True))


@pytest.mark.parametrize("task", ["classification", "labelling", "span"])
def test_every_ytuning_parameter_is_moved_by_its_tasks_loss(task):
    """No parameter whose gradient is zero by construction (a bias shared by all labels under a
    softmax over labels, or constant over tokens under a softmax over tokens)."""
    torch.manual_seed(0)
    args = {"task": task, "dropout": 0.0} | ({} if task == "span" else {"num_labels": 4})
    tuned = utuning.tune(StubText(), [("ytuning", "blocks.*", args)]).double().train()
    randomize_tuners(tuned)
    x = text_inputs()
    out = tuned(**x)
    real = x["attention_mask"]
    if task == "classification":
        loss = F.cross_entropy(out, torch.tensor([0, 1, 3]))
    elif task == "labelling":
        loss = labelling_loss(out, torch.randint(0, 4, (3, 7)).masked_fill(~real, -100))
    else:
        loss = span_loss(out, torch.tensor([[0, 3], [1, 3], [1, 1]]))
    loss.backward()
    # float64: a gradient that is zero by construction comes out at rounding level.
    grads = {n: 0.0 if p.grad is None else p.grad.abs().max().item() for n, p in tuned.named_trainable_parameters()}
    dead = [n for n, g in grads.items() if not g > 1e-6 * max(grads.values())]
    assert not dead, dead
