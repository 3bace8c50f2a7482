"""LLaMA-Adapter's adaption prompt (arXiv 2303.16199) against HF PEFT's ``AdaptionPromptConfig``.

PEFT's ``AdaptedAttention`` (peft/tuners/adaption_prompt/layer.py): the query is the layer's own
``q_proj`` of the attention input, rotated at the tokens' positions; the prompts enter ``k_proj`` /
``v_proj`` without the pre-norm and are not rotated; grouped keys/values are repeated to all heads;
``gate * softmax(q kᵀ / √Dh)`` (softmax in float32, one gate per layer) times the values, then
``o_proj``, added to the attention's output, in the top ``adapter_layers`` layers. Ours with
``gate="layer"`` is the same function; the same weights give the same logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

import utuning
from tests.helpers import assert_only_tuner_grads, call, one_thread, randomize_tuners  # noqa: F401 (fixture)
from tests.test_hf_decoder import hf_logits, left_padded, tiny_decoder
from utuning.backbones.hf_decoder import HFDecoderBackbone
from utuning.errors import ConfigError, PlacementError

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, TOP, TOKENS = 2, 1, 3  # tiny Llama: 2 layers, 4 query / 2 key-value heads; PEFT adapts the top one


def padded_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def peft_model(hf, seed: int = 1):
    """PEFT's adaption prompt on ``hf`` with random prompts and non-zero gates."""
    model = peft.get_peft_model(copy.deepcopy(hf), peft.AdaptionPromptConfig(
        adapter_len=TOKENS, adapter_layers=TOP, task_type="CAUSAL_LM")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("adaption_prompt", "adaption_gate")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("gate") else 1.0))
    return model


def from_peft(hf, model) -> utuning.TunedModel:
    """Our adaption prompt on the same layers, with PEFT's prompts and gates copied in. PEFT keeps
    ``...layers.{i}.self_attn.adaption_prompt`` (1, K, D) and ``adaption_gate`` (1,) per layer."""
    first = LAYERS - TOP
    ours = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf)), [
        ("adaption_prompt", f"blocks.{{{first}..{LAYERS - 1}}}.attn", {"tokens": TOKENS, "gate": "layer"})])
    state = {}
    for name, p in model.named_parameters():
        if name.endswith(("adaption_prompt", "adaption_gate")):
            layer = int(name.split(".layers.")[1].split(".")[0])
            ours_name = "prompts" if name.endswith("adaption_prompt") else "gate"
            state[f"blocks.{layer}.attn.adaption_prompt.{ours_name}"] = p.detach().reshape(
                ours.tuner_state_dict()[f"blocks.{layer}.attn.adaption_prompt.{ours_name}"].shape)
    ours.load_tuner_state_dict(state)
    return ours.eval()


def real(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[mask.bool()]  # (real tokens, V): padded positions are not compared


@pytest.mark.parametrize("padding", ["right", "left"])
def test_equals_peft_on_a_padded_batch(padding):
    hf = tiny_decoder("llama")
    model = peft_model(hf)
    ours = from_peft(hf, model)
    inputs = padded_batch() if padding == "right" else left_padded(padded_batch())
    with torch.no_grad():
        expected = hf_logits(model)(inputs)
        got = call(ours, inputs)
        untuned = hf_logits(hf)(inputs)
    mask = inputs["attention_mask"]
    assert (real(expected, mask) - real(untuned, mask)).abs().max() > 1e-3  # the adapter changes the logits
    torch.testing.assert_close(real(got, mask), real(expected, mask), atol=1e-5, rtol=1e-5)


def test_paper_form_differs_from_peft_only_by_the_gate_shape():
    """Per-head gates all equal to PEFT's per-layer gate give PEFT's logits again; the old form
    (no W_o, prompts through the pre-norm, un-rotated query) does not."""
    hf = tiny_decoder("llama")
    model = peft_model(hf)
    ours = from_peft(hf, model)
    per_head = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf)), [
        ("adaption_prompt", f"blocks.{LAYERS - 1}.attn", {"tokens": TOKENS})]).eval()
    old = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf)), [
        ("adaption_prompt", f"blocks.{LAYERS - 1}.attn",
         {"tokens": TOKENS, "gate": "layer", "project": False, "prompt_norm": True, "rotate_query": False})]).eval()
    state = ours.tuner_state_dict()
    key = f"blocks.{LAYERS - 1}.attn.adaption_prompt.gate"
    assert per_head.tuner_state_dict()[key].shape == (1, 4, 1, 1) and state[key].shape == (1, 1, 1, 1)
    per_head.load_tuner_state_dict({**state, key: state[key].expand(1, 4, 1, 1).clone()})
    old.load_tuner_state_dict(state)
    inputs = padded_batch(3)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        expected = real(hf_logits(model)(inputs), mask)
        torch.testing.assert_close(real(call(per_head, inputs), mask), expected, atol=1e-5, rtol=1e-5)
        assert (real(call(old, inputs), mask) - expected).abs().max() > 1e-3


def test_zero_gate_is_the_identity_and_only_tuner_parameters_train():
    hf = tiny_decoder("llama")
    inputs = padded_batch(2)
    tuned = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf)), [("adaption_prompt", "blocks.*.attn", {"tokens": 4})])
    with torch.no_grad():
        torch.testing.assert_close(real(call(tuned.eval(), inputs), inputs["attention_mask"]),
                                   real(hf_logits(hf)(inputs), inputs["attention_mask"]), atol=1e-6, rtol=0)
    call(tuned.train(), inputs).pow(2).mean().backward()  # at g = 0 only the gates get a gradient
    tuners = [a.tuner for a in tuned.attached()]
    assert all(t.gate.grad.abs().max() > 0 and t.prompts.grad.abs().max() == 0 for t in tuners)
    randomize_tuners(tuned)
    assert_only_tuner_grads(tuned, inputs)  # now every prompt and gate moves, and nothing frozen


def test_gradient_checkpointing_recomputes_the_rotated_query():
    """The rotated query needs the call's positions: with gradient checkpointing the layer runs
    again in backward, and the gradients equal those without it."""
    hf = tiny_decoder("llama")
    inputs = padded_batch(4)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same initial prompts
        tuned = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf)), [("adaption_prompt", "blocks.*.attn", {"tokens": 2})])
        randomize_tuners(tuned)
        tuned.backbone.set_grad_checkpointing(checkpointing)
        call(tuned.train(), inputs).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in tuned.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_refusals_name_the_missing_entry_and_change_nothing():
    hf = tiny_decoder("gpt2")
    backbone = HFDecoderBackbone(copy.deepcopy(hf))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(ConfigError, match="gate='heads'.*did you mean.*'head'"):
        utuning.tune(backbone, [("adaption_prompt", "blocks.*.attn", {"gate": "heads"})])
    site = utuning.SiteSpec("blocks.0.attn", "attn", 32, frozenset({"parallel"}), num_heads=2, head_dim=16,
                            features=frozenset({"query", "key_value"}))
    with pytest.raises(PlacementError, match="project=True needs the handle entry 'out_proj'.*project=False"):
        utuning.TUNERS.get("adaption_prompt")(site=site)
    with pytest.raises(PlacementError, match="prompt_norm=False needs the handle entry 'raw_key_value'"):
        utuning.TUNERS.get("adaption_prompt")(site=site, project=False)
    assert not any(len(s) for s in backbone.slots.values())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    # GPT-2 has no rotary positions: its query is the attention's own, and PEFT's GPT-2 form is project=False.
    tuned = utuning.tune(backbone, [("adaption_prompt", "blocks.1.attn", {"tokens": 2, "project": False})])
    assert not tuned.attached()[0].tuner.rotate_query


def test_cached_steps_rotate_the_query_at_the_new_positions():
    """Generation with the KV cache: each new token's query is rotated at its own position, so
    cached steps equal the full forward (left-padded prompts, prompts of different lengths)."""
    hf = tiny_decoder("llama")
    tuned = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf)), [("adaption_prompt", "blocks.*.attn", {"tokens": 2})])
    randomize_tuners(tuned.eval(), std=0.5)
    backbone, inputs = tuned.backbone, left_padded(padded_batch(5))
    more = torch.randint(1, 100, (3, 3), generator=torch.Generator().manual_seed(6))
    ids, mask = torch.cat([inputs["input_ids"], more], 1), torch.cat([inputs["attention_mask"], torch.ones_like(more)], 1)
    with torch.no_grad():
        full = call(tuned, {"input_ids": ids, "attention_mask": mask})[:, -3:]  # (B, 3, V)
        cache = backbone.new_cache()
        backbone(inputs["input_ids"], inputs["attention_mask"], cache=cache)
        steps = [backbone(more[:, t:t + 1], torch.ones(3, 1, dtype=torch.long), cache=cache) for t in range(3)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
