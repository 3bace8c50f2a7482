"""Behaviour of the decoder-LLM backbone (Llama, Mistral, Qwen2, Qwen3, GPT-2) x tuners.

Every batch is padded (right or left), so a misplaced mask or position changes the numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import utuning
from tests.helpers import assert_only_tuner_grads, assert_state_round_trip, call, randomize_tuners
from utuning.backbones.hf_decoder import TINY, TINY_GPT2, HFDecoderBackbone
from utuning.errors import PlacementError, UnknownNameError, UnsupportedModelError

CONFIGS = {
    "llama": ("llama", TINY),
    "mistral": ("mistral", {**TINY, "sliding_window": 5}),  # a window shorter than the batches
    "qwen2": ("qwen2", TINY),
    "qwen3": ("qwen3", {**TINY, "head_dim": 8}),
    "gpt2": ("gpt2", {**TINY_GPT2, "bos_token_id": 1, "eos_token_id": 1}),
}
FAMILIES = list(CONFIGS)
LLAMA_LINEARS = ["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.attn.proj", "blocks.*.mlp.*"]
GPT2_LINEARS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.*"]


def tiny_decoder(family: str, task: str = "causal_lm", seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    model_type, extra = CONFIGS[family]
    config = tf.AutoConfig.for_model(model_type, pad_token_id=0, num_labels=3, **extra)
    torch.manual_seed(seed)
    auto = tf.AutoModelForCausalLM if task == "causal_lm" else tf.AutoModelForSequenceClassification
    return auto.from_config(config).to(dtype).eval()


def pair(family: str, task: str = "causal_lm", dtype=torch.float32):
    hf = tiny_decoder(family, task, dtype=dtype)
    return hf, lambda: HFDecoderBackbone(copy.deepcopy(hf))


def left_padded(inputs: dict) -> dict:
    """The same rows with their padding moved to the left."""
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        ids[r] = torch.cat([ids[r, n:], ids[r, :n]])
        mask[r] = torch.cat([mask[r, n:], mask[r, :n]])
    return {"input_ids": ids, "attention_mask": mask}


def hf_logits(hf):
    """HF's forward with positions counting real tokens (what HF generate passes)."""
    def run(inputs):
        pos = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        return hf(**inputs, position_ids=pos).logits
    return run


def linears(family: str) -> list[str]:
    return GPT2_LINEARS if family == "gpt2" else LLAMA_LINEARS


def identity_specs(family: str) -> dict[str, list]:
    return {
        "p_adapter": [("p_adapter", ["blocks.*", "blocks.*.attn", "blocks.*.mlp"], {"hidden": 4})],
        "houlsby": [{"name": "houlsby_adapter", "at": "blocks.*"}],
        "p_prefix": [("p_prefix", "blocks.*.attn", {"tokens": 3})],
        "p_prompt": [("p_prompt", "blocks.*.mlp", {"tokens": 3})],
        "lora": [("lora", linears(family), {"rank": 2})],
        "bitfit_ia3": [("bitfit", linears(family)[-1]), ("ia3", linears(family)[-1], {"feedforward": True})],
    }


CHANGING = {
    "vpt_shallow": [("prompt", "embed", {"tokens": 3})],
    "vpt_deep": [("prompt", "blocks.*", {"tokens": 2})],
    "prefix": [("prefix", "blocks.*.attn", {"tokens": 3})],
    "prompt_parallel": [("prompt_parallel", "blocks.*.attn", {"tokens": 2})],
}


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
@pytest.mark.parametrize("family", FAMILIES)
def test_untuned_equals_hf_on_right_and_left_padding(family, task):
    hf, make = pair(family, task)
    backbone = make()
    right = backbone.example_inputs(3, 8)
    for inputs in (right, left_padded(right)):
        with torch.no_grad():
            ours, ref = backbone(**inputs), hf_logits(hf)(inputs)
        if task == "causal_lm":
            real = inputs["attention_mask"].bool()
            torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
        else:  # HF reads the last non-pad token: right for both paddings
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert set(backbone.frozen_state_dict()) == set(hf.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_tuners_are_the_identity(family):
    hf, make = pair(family)
    inputs = left_padded(make().example_inputs(3, 8))
    real = inputs["attention_mask"].bool()
    for name, specs in identity_specs(family).items():
        tuned = utuning.tune(make(), specs).eval()
        with torch.no_grad():
            torch.testing.assert_close(call(tuned, inputs)[real], hf_logits(hf)(inputs)[real], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_only_tuner_parameters_get_gradients_and_state_round_trips(family):
    _, make = pair(family)
    inputs = make().example_inputs(2, 6)
    specs = [*identity_specs(family)["lora"], *CHANGING["vpt_shallow"], *CHANGING["prefix"],
             ("p_adapter", "blocks.*.mlp", {"hidden": 4}), ("prompt", "blocks.1", {"tokens": 2})]
    tuned = utuning.tune(make(), specs)
    randomize_tuners(tuned)
    assert_only_tuner_grads(tuned, inputs)
    assert_state_round_trip(lambda: utuning.tune(make(), specs), inputs)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("method", list(CHANGING))
def test_padding_side_does_not_change_real_tokens(family, method):
    """Prompts, prefixes and positions follow the mask: a row's logits do not depend on its padding."""
    _, make = pair(family)
    tuned = utuning.tune(make(), CHANGING[method]).eval()
    randomize_tuners(tuned)
    right = tuned.backbone.example_inputs(3, 8)
    left = left_padded(right)
    with torch.no_grad():
        a, b = tuned(**right), tuned(**left)
        alone = tuned(input_ids=right["input_ids"][1:2, :5])  # row 1 without padding
    torch.testing.assert_close(a[right["attention_mask"].bool()], b[left["attention_mask"].bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1, :5], alone[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(a, make()(**right), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_exact_parallel_forms_under_the_causal_mask(family):
    """Res-Tuning Eq. 11-13 / U-Tuning Eq. 3-5 in float64: prompt at a block equals prompt_parallel
    at its attention (un-rotated prompt keys), and prefix's joint and parallel forms agree."""
    hf = tiny_decoder(family, dtype=torch.float64)
    inputs = left_padded(HFDecoderBackbone(copy.deepcopy(hf)).example_inputs(3, 8))
    real = inputs["attention_mask"].bool()

    def run(specs, prompts=None, state=None):
        tuned = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf)), specs).eval()
        randomize_tuners(tuned, std=0.5)
        if prompts is not None:
            for a in tuned.attached():
                a.tuner.prompts.data.copy_(prompts[a.sites[0].rsplit(".", 1)[0]])
        if state is not None:
            tuned.load_tuner_state_dict(state)
        with torch.no_grad():
            return tuned, tuned(**inputs)[real]

    deep, y_deep = run([("prompt", "blocks.*", {"tokens": 3})])
    prompts = {a.sites[0]: a.tuner.prompts.data for a in deep.attached()}
    _, y_par = run([("prompt_parallel", "blocks.*.attn", {"tokens": 3, "form": "parallel"})], prompts)
    torch.testing.assert_close(y_par, y_deep, atol=1e-10, rtol=0)
    joint, y_joint = run([("prefix", "blocks.*.attn", {"tokens": 3, "form": "joint"})])
    _, y_split = run([("prefix", "blocks.*.attn", {"tokens": 3, "form": "parallel"})], state=joint.tuner_state_dict())
    torch.testing.assert_close(y_split, y_joint, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_merge_equals_unmerged_including_gpt2_conv1d_parts(family):
    _, make = pair(family)
    specs = [("lora", linears(family), {"rank": 2})]
    if family == "gpt2":
        specs = [("lora", "blocks.*.attn.qkv", {"rank": 2, "parts": ["q", "v"]}), ("lora", "blocks.*.mlp.fc1", {"rank": 2})]
    tuned = utuning.tune(make(), specs).eval()
    randomize_tuners(tuned)
    inputs = tuned.backbone.example_inputs(2, 6)
    before = {k: v.clone() for k, v in tuned.backbone.frozen_state_dict().items()}
    with torch.no_grad():
        y = tuned(**inputs)
        tuned.merge()
        changed = [k for k, v in tuned.backbone.frozen_state_dict().items() if not torch.equal(v, before[k])]
        torch.testing.assert_close(tuned(**inputs), y, atol=1e-5, rtol=1e-5)
        tuned.unmerge()
        torch.testing.assert_close(tuned(**inputs), y, atol=1e-5, rtol=1e-5)
    assert changed and all("weight" in k for k in changed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_side_tuners_read_hf_hidden_states(family):
    hf, make = pair(family)
    backbone = make()
    inputs = backbone.example_inputs(3, 8)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        feats = backbone.intermediates(**inputs, layers=[0])
        ref = hf(**inputs, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(feats.layers[0][real], ref[real], atol=1e-5, rtol=1e-5)
    last = real.long().sum(1) - 1
    torch.testing.assert_close(feats.pooled, feats.final[torch.arange(3), last])
    tuned = utuning.tune(make(), [{"name": "ytuning", "at": "blocks.*", "args": {"num_labels": 3, "hidden": 16}},
                                  {"name": "bypass", "at": "blocks.*", "args": {"num_classes": 3}, "key": "b"}])
    out = tuned(**inputs)
    assert out["ytuning"].shape == (3, 3) and out["b"].shape == (3, 3)
    (out["ytuning"].pow(2).mean() + out["b"].pow(2).mean()).backward()
    assert all(p.grad is not None for p in tuned.trainable_parameters())
    assert all(p.grad is None for p in tuned.backbone.parameters())


def test_bf16_frozen_weights_with_fp32_tuners():
    hf32, _ = pair("llama")
    backbone = HFDecoderBackbone(copy.deepcopy(hf32).to(torch.bfloat16))
    tuned = utuning.tune(backbone, [("lora", LLAMA_LINEARS, {"rank": 2}), ("prefix", "blocks.*.attn", {"tokens": 2})])
    assert all(p.dtype == torch.float32 for p in tuned.trainable_parameters())
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}
    inputs = backbone.example_inputs(2, 6)
    tuned32 = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf32)), tuned.specs)
    tuned32.load_tuner_state_dict(tuned.tuner_state_dict())
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(tuned(**inputs)[real].float(), tuned32(**inputs)[real], atol=0.1, rtol=0.05)
    assert_only_tuner_grads(tuned, inputs)
    assert all(p.grad.dtype == torch.float32 for p in tuned.trainable_parameters())


def test_refusals_are_named():
    config = tf.AutoConfig.for_model("gemma", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64, vocab_size=100, head_dim=16)
    with pytest.raises(UnknownNameError, match="Gemma scales the embeddings"):
        HFDecoderBackbone(tf.AutoModelForCausalLM.from_config(config))
    odd = tiny_decoder("gpt2")
    odd.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        HFDecoderBackbone(odd)
    swapped = tiny_decoder("llama")
    swapped.model.layers[1] = tiny_decoder("qwen2").model.layers[1]
    with pytest.raises(UnsupportedModelError, match="layers.1 is a Qwen2DecoderLayer"):
        HFDecoderBackbone(swapped)
    with pytest.raises(PlacementError, match="does not offer"):
        utuning.tune(HFDecoderBackbone(tiny_decoder("llama")), [("prefix", "blocks.*.mlp", {"tokens": 2})])
    with pytest.raises(UnknownNameError, match="Phi-3 fuses"):
        HFDecoderBackbone.create(model="phi3", pretrained=False)
    with pytest.raises(UnknownNameError, match="NoPE"):
        HFDecoderBackbone.create(model="smollm3", pretrained=False)
    extra = tiny_decoder("llama")
    extra.model.layers[0].self_attn.gate = torch.nn.Linear(4, 4)  # a part the re-written forward would skip
    with pytest.raises(UnsupportedModelError, match=r"layers.0 has submodules \['gate'\]"):
        HFDecoderBackbone(extra)


def test_wrap_and_create_pick_the_decoder_adapter():
    assert isinstance(utuning.wrap(tiny_decoder("qwen2")), HFDecoderBackbone)
    backbone = utuning.build_backbone("hf_decoder", model="llama", task="classification", num_classes=4, **TINY)
    assert backbone.task == "classification" and backbone.site_specs()["head"].out_dim == 4
    with torch.no_grad():
        assert call(backbone, backbone.example_inputs(2, 5)).shape == (2, 4)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantised_frozen_weights_with_lora_refuse_merge_until_dequantized(method):
    pytest.importorskip("torchao" if method == "int8" else "bitsandbytes")
    from utuning.backbones.hf_decoder_quant import quantize_linears

    config = tf.AutoConfig.for_model("llama", pad_token_id=0, **{**TINY, "hidden_size": 64, "intermediate_size": 128})
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(config).eval()
    quantised = copy.deepcopy(hf)
    assert quantize_linears(quantised, method) == 14
    backbone = HFDecoderBackbone(quantised)
    tuned = utuning.tune(backbone, [("lora", LLAMA_LINEARS, {"rank": 2})])
    inputs = backbone.example_inputs(2, 6)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():  # quantisation error only: close to the float model, not equal
        err = (tuned(**inputs) - HFDecoderBackbone(copy.deepcopy(hf))(**inputs))[real].abs().max()
    assert 0 < err < 0.2
    randomize_tuners(tuned)
    assert_only_tuner_grads(tuned, inputs)
    tuned.eval()
    with pytest.raises(PlacementError, match="quantised .* backbone.dequantize()"):
        tuned.merge()
    assert not any(a.tuner.merged for a in tuned.attached())
    assert backbone.dequantize() == 14
    with torch.no_grad():
        y = tuned(**inputs)
        tuned.merge()
        torch.testing.assert_close(tuned(**inputs), y, atol=1e-5, rtol=1e-5)


def tiny_tokenizer(vocab_size: int = 300) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a few sentences (<pad> 0, <s> 1, </s> 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran in the park", "hello world, said the bird"], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_lora_equals_peft_lora_on_llama():
    peft = pytest.importorskip("peft")
    hf, make = pair("llama")
    tuned = utuning.tune(make(), [("lora", "blocks.*.attn.{q,v}", {"rank": 2, "alpha": 4})]).eval()
    randomize_tuners(tuned)
    ref = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for a in tuned.attached():
            i, part = a.sites[0].split(".")[1], a.sites[0].rsplit(".", 1)[1]
            layer = getattr(ref.base_model.model.model.layers[int(i)].self_attn, f"{part}_proj")
            layer.lora_A["default"].weight.copy_(a.tuner.lora_A[0])
            layer.lora_B["default"].weight.copy_(a.tuner.lora_B[0])
    inputs = left_padded(tuned.backbone.example_inputs(3, 8))
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(tuned(**inputs)[real], hf_logits(ref.eval())(inputs)[real], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_keeps_outputs_and_gradients():
    _, make = pair("llama")
    specs = [("lora", "blocks.*.attn.{q,v}", {"rank": 2}), ("prompt", "blocks.*", {"tokens": 2})]
    inputs = make().example_inputs(2, 6)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        tuned = utuning.tune(make(), specs)
        randomize_tuners(tuned)
        tuned.set_grad_checkpointing(enable)
        out = tuned(**inputs)
        out.pow(2).mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in tuned.trainable_parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1)


def _zoo_cases() -> list:
    from tests.test_eva import ZOO

    gaps: dict[str, str] = {}  # known gaps of tuners (not of this backbone), kept visible as strict xfails
    cases = []
    for name in ZOO:
        mark = [pytest.mark.xfail(strict=True, reason=gaps[name])] if name in gaps else []
        cases.append(pytest.param("llama", name, marks=mark, id=f"llama-{name}"))
        if utuning.TUNERS.get(name).placement in ("reparam", "unfreeze"):  # GPT-2's Conv1D linears
            cases.append(pytest.param("gpt2", name, id=f"gpt2-{name}"))
    return cases


@pytest.mark.parametrize(("family", "name"), _zoo_cases())
def test_every_registered_tuner_on_decoders(family, name):
    """The registry-driven zoo contract of ``tests/test_eva.py``: identity at init (unless the method
    changes outputs), only its own gradients, state round trip, exact merge, or a named refusal."""
    from tests.test_eva import check_zoo_tuner

    _, make = pair(family)
    reference = make()
    refusals = {}  # ln_tuning trains Llama's RMSNorm weights too
    check_zoo_tuner(name, make, lambda i: reference(**i), reference.example_inputs(2, 6), refusals=refusals,
                    changing=frozenset({"linear_probe"}))  # a new head on a causal LM


def test_rotary_query_is_bound_to_the_call_and_no_call_state_stays_on_the_layers():
    """``rotary_query`` reads the positions of the call it is handed for (a handle bound per call),
    so gradient checkpointing's re-run sees the same positions, and outside a call it is refused."""
    from utuning.backbones.hf_decoder_layers import Context

    _, make = pair("llama")
    specs = [("adaption_prompt", "blocks.*.attn", {"tokens": 3})]
    inputs = left_padded(make().example_inputs(2, 6))
    runs = []
    for enable in (False, True):
        torch.manual_seed(0)
        tuned = utuning.tune(make(), specs)
        randomize_tuners(tuned)
        tuned.set_grad_checkpointing(enable)
        out = tuned(**inputs)
        out.pow(2).mean().backward()
        runs.append((out.detach(), [p.grad.clone() for p in tuned.trainable_parameters()]))
        layers = tuned.backbone.base[0].layers
        assert not [k for layer in layers for k, v in vars(layer).items() if isinstance(v, Context)]
    torch.testing.assert_close(runs[0][0], runs[1][0])
    for g0, g1 in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(g0, g1)
    handle = tuned.backbone.slot("blocks.0.attn").handle
    with pytest.raises(PlacementError, match="blocks.0.attn.*during the layer's forward"):
        handle.rotary_query(torch.zeros(1, 2, handle.layer.self_attn.o_proj.in_features))


@pytest.mark.parametrize("site", ["blocks.*", "blocks.*.mlp", "blocks.*.attn"])
def test_loreft_edits_prompt_positions_only_when_decoding(site):
    """Cached decoding: LoReFT (first / last real tokens) edits the prompt's positions in the first
    chunk and no generated token (pyreft's convention): decoding a token gives the same logits as
    with the intervention switched off for that chunk, and the prefill differs from the untuned one."""
    _, make = pair("llama")
    tuned = utuning.tune(make(), [("loreft", site, {"rank": 2, "first": 1, "last": 1})]).eval()
    randomize_tuners(tuned)
    backbone = tuned.backbone
    inputs = left_padded(backbone.example_inputs(2, 6))
    token = torch.tensor([[5], [7]])
    with torch.no_grad():
        cache = backbone.new_cache()
        prefill = backbone(**inputs, cache=cache, last_only=True)
        kept = copy.deepcopy(cache)
        edited = backbone(token, torch.ones_like(token), cache=cache, last_only=True)
        for p in tuned.trainable_parameters():
            p.zero_()  # LoReFT at zero is the identity
        plain = backbone(token, torch.ones_like(token), cache=kept, last_only=True)
        untuned_prefill = backbone(**inputs, cache=backbone.new_cache(), last_only=True)
    torch.testing.assert_close(edited, plain)
    assert not torch.allclose(prefill, untuned_prefill)
