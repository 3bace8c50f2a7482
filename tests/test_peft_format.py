"""HF PEFT adapter folders both ways, on a tiny timm ViT and a tiny BERT: ours -> PEFT -> ours gives
equal outputs at every step (PEFT -> ours -> PEFT is in test_peft_equivalence.py, for every kind);
what cannot be read or written exactly is refused by name."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import utuning
from tests.helpers import one_thread, randomize_tuners, tiny_vit  # noqa: F401 (one_thread: fixture)
from tests.test_peft_equivalence import bert_base, peft_model
from tests.text_helpers import padded_inputs
from utuning.peft_format import export_peft, load_peft

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def _run(model, inputs):
    if isinstance(model, utuning.TunedModel):
        return model(**inputs)
    out = model(inputs["pixel_values"]) if "pixel_values" in inputs else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _from_pretrained(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def _family(name):
    if name == "vit":
        base = tiny_vit().eval()
        return base, IMAGES
    base = bert_base()
    return base, padded_inputs(utuning.wrap(copy.deepcopy(base)))


QKV = "blocks.*.attn.qkv"
OURS = {  # id -> (family, specs)
    "lora-parts": ("vit", [("lora", QKV, {"rank": 2, "parts": ["q", "v"]}), ("linear_probe", "head", {})]),
    "lora-ranks": ("vit", [("lora", "blocks.0.mlp.fc1", {"rank": 2}), ("lora", "blocks.1.mlp.fc1", {"rank": 3})]),
    "pissa": ("vit", [("lora", "blocks.*.mlp.fc1", {"rank": 2, "init": "pissa"}), ("full", "head", {})]),
    "dora-rslora": ("vit", [("dora", QKV, {"rank": 2, "alpha": 4, "rslora": True, "fused": True})]),
    "loha": ("vit", [("loha", [QKV, "blocks.*.mlp.fc2"], {"rank": 2, "alpha": 3})]),
    "lokr": ("vit", [("lokr", "blocks.*.mlp.*", {"rank": 2, "decompose_both": True})]),
    "oft": ("vit", [("oft", QKV, {"block_size": 8})]),
    "oft-neumann": ("vit", [("oft", "blocks.*.mlp.fc2", {"block_size": 16, "cayley": "neumann"})]),
    "ia3": ("vit", [("ia3", QKV, {"parts": ["k", "v"]}), ("ia3", "blocks.*.mlp.fc2", {"feedforward": True})]),
    "ln_tuning": ("vit", [("ln_tuning", ["blocks.*.attn", "blocks.*.mlp", "norm"], {})]),
    "vera": ("vit", [("vera", "blocks.*.mlp.fc1", {"rank": 4})]),
    "bert-lora": ("bert", [("lora", "blocks.*.attn.{q,v}", {"rank": 2}), ("full", "head", {})]),
    "bert-dora": ("bert", [("dora", "blocks.*.mlp.fc1", {"rank": 2})]),
    "bert-lokr": ("bert", [("lokr", "blocks.*.attn.v", {"rank": 2})]),
    "bert-ln_tuning": ("bert", [("ln_tuning", ["embed", "blocks.*.attn", "blocks.*.mlp"], {})]),
    "bert-oft": ("bert", [("oft", "blocks.*.attn.proj", {"block_size": 8})]),
}


@pytest.mark.parametrize("case", list(OURS))
def test_ours_to_peft_to_ours(case, tmp_path):
    family, specs = OURS[case]
    base, inputs = _family(family)
    ours = utuning.tune(utuning.wrap(copy.deepcopy(base)), specs).eval()
    randomize_tuners(ours, std=0.05)
    export_peft(ours, tmp_path)
    theirs = _from_pretrained(base, tmp_path)
    back = load_peft(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        expected = _run(ours, inputs)
        assert not torch.allclose(expected, _run(base, inputs), atol=1e-4)
        torch.testing.assert_close(_run(theirs, inputs), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(_run(back, inputs), expected, atol=1e-5, rtol=0)


def test_config_fields_written_are_known_to_peft(tmp_path):
    ours = utuning.tune(utuning.wrap(tiny_vit()), [("lora", "blocks.*.attn.qkv", {"rank": 2})])
    export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config) <= {f.name for f in __import__("dataclasses").fields(peft.LoraConfig)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_refusals(tmp_path):
    base = tiny_vit()
    theirs = peft_model(base, "LoraConfig", {"r": 2, "target_modules": ["qkv"]})
    theirs.save_pretrained(str(tmp_path / "ok"))
    with pytest.raises(utuning.StateDictError, match=r"do not fit this model.*lora_A: adapter \(1, 2, 32\) vs model \(1, 2, 64\)"):
        load_peft(tiny_vit(dim=64, heads=2), tmp_path / "ok")
    config_path = tmp_path / "ok" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for field, value in (("lora_bias", True), ("use_qalora", True), ("layer_replication", [[0, 1]])):
        config_path.write_text(json.dumps({**config, field: value}))
        with pytest.raises(utuning.ConfigError, match=f"field {field}="):
            load_peft(copy.deepcopy(base), tmp_path / "ok")
    config_path.write_text(json.dumps({**config, "init_lora_weights": "loftq"}))
    with pytest.raises(utuning.ConfigError, match="init_lora_weights='loftq'"):
        load_peft(copy.deepcopy(base), tmp_path / "ok")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text(json.dumps(config))
    torch.save({}, legacy / "adapter_model.bin")
    with pytest.raises(utuning.ConfigError, match="legacy adapter_model.bin, a pickle"):
        load_peft(copy.deepcopy(base), legacy)
    (legacy / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2}))
    (legacy / "adapter_model.safetensors").write_bytes((tmp_path / "ok" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(utuning.ConfigError, match="The .vit. backbone adapter takes no argument .position_offset."):
        load_peft(copy.deepcopy(base), legacy)
    with pytest.raises(utuning.ConfigError, match="shift_positions applies to PEFT PREFIX_TUNING adapters, not LORA"):
        load_peft(copy.deepcopy(base), tmp_path / "ok", shift_positions=True)
    pooler = peft_model(bert_base(), "LoraConfig", {"r": 2, "target_modules": ["pooler.dense"]})
    pooler.save_pretrained(str(tmp_path / "pooler"))
    with pytest.raises(utuning.PlacementError, match="'bert.pooler.dense', which is not a linear site"):
        load_peft(bert_base(), tmp_path / "pooler")


@pytest.mark.parametrize(("specs", "match"), [
    ([("p_adapter", "blocks.*.attn", {"hidden": 4})], "'p_adapter' at 'blocks.0.attn' has no PEFT form"),
    ([("dual_u_tuner", "blocks.*", {"hidden": 4})], "has no PEFT form"),
    ([("prompt", "embed", {"tokens": 2})], "read and written on the hf_text backbone only, not a ViTBackbone"),
    ([("prompt", "embed", {"tokens": 2}), ("lora", QKV, {})], "'prompt' at 'embed' has no PEFT form: PEFT's prompt"),
    ([("lora", QKV, {}), ("ia3", "blocks.*.mlp.fc2", {})], r"one adapter type .*\['IA3', 'LORA'\]"),
    ([("lora", QKV, {}), ("dora", "blocks.*.mlp.fc1", {})], "one use_dora / lora_dropout per adapter"),
    ([("full", "embed", {})], "loose parameters"),
])
def test_export_refuses_what_peft_cannot_hold(specs, match, tmp_path):
    with pytest.raises(utuning.ConfigError, match=match):
        export_peft(utuning.tune(utuning.wrap(tiny_vit()), specs), tmp_path)


def test_linear_probe_on_bert_head_is_refused(tmp_path):
    ours = utuning.tune(utuning.wrap(bert_base()), [("lora", "blocks.*.attn.q", {}), ("linear_probe", "head", {})])
    with pytest.raises(utuning.ConfigError, match=r"replaces \['bert.pooler', 'classifier'\].*use 'full'|train the head with 'full'"):
        export_peft(ours, tmp_path)


# Prompt learning (utuning.peft_prompts) ---------------------------------------------------------
def _prefix_reference(theirs, inputs, shift):
    """HF's own BERT forward with PEFT's prefix as a cache of past keys/values (what PEFT would pass; PEFT 0.21
    refuses to run it on BERT): positions shifted by the prefix length as HF does, or the input's own."""
    from transformers import DynamicCache

    past, p = theirs.get_prompt(inputs["input_ids"].shape[0]), theirs.peft_config["default"].num_virtual_tokens
    model = theirs.get_base_model()
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(past.layers):
        cache.update(layer.keys, layer.values, i)
    mask = torch.cat([torch.ones_like(inputs["attention_mask"][:, :p]), inputs["attention_mask"]], dim=1)
    positions = None if shift else torch.arange(inputs["input_ids"].shape[1])[None]
    return model(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"], attention_mask=mask,
                 cache=cache, position_ids=positions).logits


@pytest.mark.parametrize("config", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_peft_prompt_tuning_both_ways(config, tmp_path):
    """PEFT's prompts (and P-tuning's, saved as its encoder's output) go before [CLS] at the word embeddings;
    PEFT's classifier (modules_to_save) comes along; export writes a PROMPT_TUNING folder PEFT runs equally."""
    base = bert_base()
    inputs = padded_inputs(utuning.wrap(copy.deepcopy(base)))
    theirs = peft_model(base, config, {"task_type": "SEQ_CLS", "num_virtual_tokens": 3})
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = load_peft(copy.deepcopy(base), tmp_path / "theirs").eval()
    assert ours.backbone.prompt_layout == "first" and {a.tuner.name for a in ours.attached()} == {"prompt", "full"}
    export_peft(ours, tmp_path / "ours")
    again = _from_pretrained(base, tmp_path / "ours")
    with torch.no_grad():
        expected = theirs(**inputs).logits
        assert not torch.allclose(expected, base(**inputs).logits, atol=1e-3)
        torch.testing.assert_close(ours(**inputs), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(again(**inputs).logits, expected, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"


def test_our_prompt_to_peft_to_ours_trains_first_token(tmp_path):
    base = bert_base()
    backbone = utuning.wrap(copy.deepcopy(base), prompt_layout="first")
    ours = utuning.tune(backbone, [("prompt", "embed", {"tokens": 2})])
    inputs = padded_inputs(backbone)
    ours(**inputs).sum().backward()  # the head reads the first prompt: its gradient is not zero
    assert ours.backbone.slot("embed").tuners["prompt"].prompts.grad[0, 0].abs().sum() > 0
    ours.eval()
    export_peft(ours, tmp_path)
    theirs, back = _from_pretrained(base, tmp_path), load_peft(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs), atol=1e-5, rtol=0)
        torch.testing.assert_close(back(**inputs), ours(**inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [True, False])
def test_peft_prefix_equals_hf_attention_over_the_same_past_keys(shift, tmp_path):
    base = bert_base()
    inputs = padded_inputs(utuning.wrap(copy.deepcopy(base)))
    theirs = peft_model(base, "PrefixTuningConfig", {"task_type": "SEQ_CLS", "num_virtual_tokens": 3})
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = load_peft(copy.deepcopy(base), tmp_path / "theirs", shift_positions=shift).eval()
    assert ours.backbone.position_offset == (3 if shift else 0)
    with torch.no_grad():
        expected = _prefix_reference(theirs, inputs, shift)
        other = _prefix_reference(theirs, inputs, not shift)
        assert not torch.allclose(expected, other, atol=1e-3)  # the shift matters
        torch.testing.assert_close(ours(**inputs), expected, atol=1e-5, rtol=0)
    if not shift:  # PEFT runs a prefix shifted: an unshifted one has no PEFT form
        with pytest.raises(utuning.ConfigError, match="shifts the input's positions by its 3 tokens.*position_offset=0"):
            export_peft(ours, tmp_path / "ours")
        return
    export_peft(ours, tmp_path / "ours")
    again = _from_pretrained(base, tmp_path / "ours")
    back = load_peft(copy.deepcopy(base), tmp_path / "ours", shift_positions=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(_prefix_reference(again, inputs, True), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(**inputs), expected, atol=1e-5, rtol=0)


def test_prompt_learning_refusals(tmp_path):
    base = bert_base()
    theirs = peft_model(base, "PromptTuningConfig", {"task_type": "SEQ_CLS", "num_virtual_tokens": 2})
    theirs.save_pretrained(str(tmp_path))
    with pytest.raises(utuning.ConfigError, match=r"needs the text backbone built with \{'prompt_layout': 'first'"):
        load_peft(utuning.wrap(bert_base()), tmp_path)
    with pytest.raises(utuning.ConfigError, match="shift_positions applies to PREFIX_TUNING adapters"):
        load_peft(bert_base(), tmp_path, shift_positions=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_transformer_submodules": 2}))
    with pytest.raises(utuning.ConfigError, match="num_transformer_submodules=2"):
        load_peft(bert_base(), tmp_path)
    after_cls = utuning.tune(utuning.wrap(bert_base()), [("prompt", "embed", {"tokens": 2})])
    with pytest.raises(utuning.ConfigError, match="prompt_layout='first' .*prompt_layout='after_cls'"):
        export_peft(after_cls, tmp_path / "out")
    some = utuning.tune(utuning.wrap(bert_base(), position_offset=2), [("prefix", "blocks.0.attn", {"tokens": 2})])
    with pytest.raises(utuning.ConfigError, match=r"keys and values at every layer.*\['blocks.0.attn'\]"):
        export_peft(some, tmp_path / "out")
    with pytest.raises(utuning.ConfigError, match=r"prompt_layout='firts' .*closest: \['first'\]"):
        utuning.wrap(bert_base(), prompt_layout="firts")
