"""Decoder LoRA memory against HF PEFT (issue 13), and the plain-causal attention path it needs.

A batch with no padding, no cache, no prompts and no prefixes has a plain causal mask: the layers
then call SDPA with ``is_causal`` (a (B, 1, T, T) boolean mask made SDPA keep a float copy per
layer) and compute the rotary angles once for all rows (rows share positions), as HF does. Peak
live tensor bytes of a training step are exact per process (benchmarks.speed._profiled_peak).
"""

from __future__ import annotations

import copy

import pytest
import torch

import utuning
from benchmarks import llm
from benchmarks.speed import _profiled_peak, make_step
from tests.helpers import call, one_thread  # noqa: F401 (one_thread: fixture)
from tests.test_hf_decoder import hf_logits, tiny_decoder
from utuning.backbones.hf_decoder import HFDecoderBackbone

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_GQA = {**llm.LLAMA_TOY, "num_hidden_layers": 2}  # 4 query / 2 key-value heads


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gpt2"])
def test_unpadded_batches_equal_hf(family):
    """The plain-causal path (and Mistral's window shorter than the batch, which keeps the mask)
    gives HF's logits; with LoRA, it equals the masked path (the same rows plus a pad column)."""
    hf = tiny_decoder(family)
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ours = HFDecoderBackbone(copy.deepcopy(hf))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), hf_logits(hf)(inputs), atol=1e-5, rtol=1e-5)
        tuned = utuning.tune(ours, [("lora", "blocks.*.attn.*", {"rank": 2})]).eval()
        padded = {"input_ids": torch.cat([ids, ids[:, :1]], 1),
                  "attention_mask": torch.cat([inputs["attention_mask"], torch.zeros(2, 1, dtype=torch.long)], 1)}
        for p in tuned.trainable_parameters():
            p.normal_(0, 0.1)
        # A pad column at the end takes the masked path; the real tokens' logits are the same.
        torch.testing.assert_close(call(tuned, padded)[:, :-1], call(tuned, inputs), atol=1e-5, rtol=1e-5)


def _peak(method: str) -> int:
    job = {"config": TINY_GQA, "batch": 2, "seq": 16, "method": method}
    built = llm.build(job)
    return _profiled_peak(make_step(built, dict(job, mode="train")))


def test_lora_training_peak_is_at_most_peft():
    """LoRA r=8 on q, v of a tiny grouped-query Llama: our step's peak live tensor bytes <= PEFT's
    (before the plain-causal path: +1 float mask per layer and per-row rotary angles)."""
    pytest.importorskip("peft")
    assert _peak("lora") <= _peak("peft_lora")
