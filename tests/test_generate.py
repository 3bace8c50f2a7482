"""Generation with the KV cache: cached steps equal full forwards (with prompt, prefix, LoRA and
adapter tuners), greedy tokens equal Hugging Face ``generate`` untuned and with merged LoRA."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

import utuning
from tests.helpers import randomize_tuners
from tests.test_hf_decoder import LLAMA_LINEARS, left_padded, pair, tiny_decoder, tiny_tokenizer
from utuning.backbones.hf_decoder import HFDecoderBackbone
from utuning.errors import ConfigError
from utuning.generate import generate, generate_ids, generate_main

TUNERS = [("prompt", "embed", {"tokens": 2}), ("prompt", "blocks.1", {"tokens": 2}),
          ("prefix", "blocks.*.attn", {"tokens": 3}), ("p_adapter", "blocks.*.mlp", {"hidden": 4})]


def prompts(backbone: HFDecoderBackbone) -> dict:
    """Three left-padded prompts of 8, 5 and 8 tokens."""
    return left_padded(backbone.example_inputs(3, 8))


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_cached_steps_equal_the_full_forward_with_tuners(family):
    _, make = pair(family)
    lora = ("lora", LLAMA_LINEARS if family != "gpt2" else "blocks.*.attn.qkv", {"rank": 2})
    tuned = utuning.tune(make(), [*TUNERS, lora]).eval()
    randomize_tuners(tuned)
    backbone = tuned.backbone
    inputs = prompts(backbone)
    more = torch.randint(3, 100, (3, 4))
    ids = torch.cat([inputs["input_ids"], more], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(more)], 1)
    with torch.no_grad():
        full = tuned(input_ids=ids, attention_mask=mask)[:, 8:]  # (B, 4, V): logits at the new tokens
        cache = backbone.new_cache()
        steps = [backbone(inputs["input_ids"], inputs["attention_mask"], cache=cache)[:, -1:]]
        steps += [backbone(more[:, t:t + 1], torch.ones(3, 1, dtype=torch.long), cache=cache) for t in range(3)]
    # the prompt chunk's last logits predict more[:, 0]; step t's predict more[:, t + 1]
    torch.testing.assert_close(torch.cat(steps, 1), torch.cat([tuned(**inputs)[:, -1:], full[:, :3]], 1),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("tuners", ["no_prefix", "with_prefix"])
def test_unpadded_one_token_steps_see_every_key_without_a_mask(family, tuners):
    """No padding anywhere: each one-token step attends to every cached key with no mask built (as HF's
    decoding steps), except layers with prefixes and, past its window, Mistral's sliding window (window
    5: steps at positions 3, 4 are inside it, 5, 6 are not); every step equals the full forward."""
    from utuning.backbones import hf_decoder_layers

    _, make = pair(family)
    lora = ("lora", LLAMA_LINEARS if family != "gpt2" else "blocks.*.attn.qkv", {"rank": 2})
    specs = [s for s in TUNERS if tuners == "with_prefix" or s[0] != "prefix"] + [lora]
    tuned = utuning.tune(make(), specs).eval()
    randomize_tuners(tuned)
    backbone = tuned.backbone
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        full = tuned(input_ids=ids, attention_mask=torch.ones_like(ids))  # (B, 7, V)
        cache = backbone.new_cache()
        steps = [backbone(ids[:, :3], torch.ones(2, 3, dtype=torch.long), cache=cache)[:, -1:]]
        masks = []
        for t in range(3, 7):
            with mock.patch.object(hf_decoder_layers, "visible", wraps=hf_decoder_layers.visible) as built:
                steps.append(backbone(ids[:, t:t + 1], torch.ones(2, 1, dtype=torch.long), cache=cache))
            masks.append(built.call_count)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 2:], atol=1e-5, rtol=1e-5)
    if tuners == "with_prefix":
        assert masks == [2] * 4  # every layer has a prefix: its mask joins the prefix keys
    elif family == "mistral":
        assert masks == [0, 0, 2, 2]  # positions 3, 4 inside the window of 5; 5, 6 past it
    else:
        assert masks == [0] * 4


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_greedy_equals_hf_generate_untuned_and_with_merged_lora(family):
    hf, make = pair(family)
    backbone = make()
    inputs = prompts(backbone)
    kw = {"max_new_tokens": 6, "eos_token_id": None, "pad_token_id": 0}
    ref = hf.generate(**inputs, do_sample=False, **kw)[:, 8:]
    ours = generate_ids(backbone, inputs["input_ids"], inputs["attention_mask"], **kw)
    assert torch.equal(ours, ref)
    full = {"input_ids": torch.randint(3, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    assert torch.equal(generate_ids(backbone, full["input_ids"], full["attention_mask"], **kw),
                       hf.generate(**full, do_sample=False, **kw)[:, 6:])  # unpadded: steps without a mask

    linears = LLAMA_LINEARS if family != "gpt2" else ["blocks.*.attn.qkv", "blocks.*.mlp.*"]
    tuned = utuning.tune(make(), [("lora", linears, {"rank": 2})]).eval()
    randomize_tuners(tuned, std=0.3)
    unmerged = generate_ids(tuned, inputs["input_ids"], inputs["attention_mask"], **kw)
    tuned.merge()
    merged = generate_ids(tuned, inputs["input_ids"], inputs["attention_mask"], **kw)
    hf_merged = copy.deepcopy(hf)
    hf_merged.load_state_dict(tuned.backbone.frozen_state_dict())
    assert torch.equal(merged, hf_merged.generate(**inputs, do_sample=False, **kw)[:, 8:])
    assert torch.equal(unmerged, merged)
    assert not torch.equal(merged, ref)  # the LoRA update changed the text


def test_generate_text_eos_sampling_and_refusals():
    tok = tiny_tokenizer()
    hf = tiny_decoder("llama")
    hf.resize_token_embeddings(len(tok))
    tuned = utuning.tune(HFDecoderBackbone(hf), [("prefix", "blocks.*.attn", {"tokens": 2})]).eval()
    texts = generate(tuned, tok, ["the cat", "a dog ran in the"], max_new_tokens=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    enc = tok(["the cat", "a dog ran in the"], padding=True, padding_side="left", return_tensors="pt")
    greedy = generate_ids(tuned, enc["input_ids"], enc["attention_mask"], max_new_tokens=5)
    eos = int(greedy[0, 1])  # stop row 0 at its second token: later tokens become padding
    stopped = generate_ids(tuned, enc["input_ids"], enc["attention_mask"], max_new_tokens=5, eos_token_id=eos,
                           pad_token_id=0)
    assert stopped[0, 1] == eos and (stopped[0, 2:] == 0).all()
    a, b = (generate_ids(tuned, enc["input_ids"], enc["attention_mask"], max_new_tokens=5, do_sample=True,
                         temperature=2.0, seed=7) for _ in range(2))
    assert torch.equal(a, b)
    top1 = generate_ids(tuned, enc["input_ids"], enc["attention_mask"], max_new_tokens=5, do_sample=True, top_k=1, seed=3)
    assert torch.equal(top1, greedy)
    with pytest.raises(ConfigError, match="left-padded"):
        generate_ids(tuned, enc["input_ids"], torch.cat([enc["attention_mask"][:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1))
    side = utuning.tune(HFDecoderBackbone(tiny_decoder("llama")), [("bypass", "blocks.*", {"num_classes": 2})])
    with pytest.raises(ConfigError, match="side tuners"):
        generate_ids(side, enc["input_ids"])
    with pytest.raises(ConfigError, match="causal language model"):
        generate_ids(HFDecoderBackbone(tiny_decoder("llama", "classification")), enc["input_ids"])


def gpt2_recipe(tmp_path) -> object:
    """A tiny GPT-2 with its tokenizer saved as a model folder, and a LoRA recipe over it."""
    tok = tiny_tokenizer()
    hf = tiny_decoder("gpt2")
    hf.resize_token_embeddings(len(tok))
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: gen
backbone: {{name: hf_decoder, model: {tmp_path / 'model'}, pretrained: true}}
tuners: [{{name: lora, at: "blocks.*.attn.qkv", args: {{rank: 2, parts: [q, v]}}}}]
task: {{type: causal_lm}}
data: {{name: causal_lm, root: {tmp_path}}}
""")
    return recipe


def test_generate_main_from_a_recipe_and_a_model_folder(tmp_path):
    recipe = gpt2_recipe(tmp_path)
    out = generate_main(recipe, None, ["the cat", "hello"], max_new_tokens=4)
    backbone = HFDecoderBackbone.create(model=str(tmp_path / "model"), pretrained=True)
    assert out == generate(backbone, backbone.tokenizer, ["the cat", "hello"], max_new_tokens=4)  # LoRA B = 0


def test_bf16_frozen_model_generates_with_fp32_tuners():
    backbone = HFDecoderBackbone.create(model="llama", pretrained=False, dtype="bfloat16", vocab_size=100,
                                        hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, pad_token_id=0)
    assert backbone.frozen_dtype == torch.bfloat16
    tuned = utuning.tune(backbone, [("lora", LLAMA_LINEARS, {"rank": 2}), ("prompt", "embed", {"tokens": 2})]).eval()
    randomize_tuners(tuned)
    inputs = prompts(backbone)
    ids = generate_ids(tuned, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=4)
    with torch.no_grad():  # the first new token is the arg-max of the full forward's last logits
        first = tuned(**inputs)[:, -1].argmax(-1)
    assert ids.shape == (3, 4) and torch.equal(ids[:, 0], first)
