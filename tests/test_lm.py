"""Causal-LM data (loss on completion tokens only), the ``causal_lm`` task, and sequence
classification on decoders through the ordinary text data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import utuning
from tests.test_hf_decoder import LLAMA_LINEARS, tiny_decoder, tiny_tokenizer
from utuning.backbones.hf_decoder import HFDecoderBackbone
from utuning.data import IGNORE_INDEX, build_dataset, compute_metrics
from utuning.data.lm import lm_loss, lm_predictions
from utuning.errors import ConfigError
from utuning.tasks import TASKS

ROWS = [{"prompt": "the cat sat on", "completion": " the mat"}, {"text": "a dog ran in the park"},
        {"prompt": "hello", "completion": " world, said the bird"}]


@pytest.fixture()
def lm_setup(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    hf = tiny_decoder("llama")
    hf.resize_token_embeddings(len(tok))
    return tok, tmp_path, hf


def test_labels_mask_prompts_keep_completions_and_truncate_from_the_prompt(lm_setup):
    tok, root, _ = lm_setup
    ds = build_dataset("causal_lm", split="train", root=str(root), tokenizer=tok)
    assert ds.task == "causal_lm" and len(ds) == 3
    item = ds[0]
    prompt = tok("the cat sat on")["input_ids"]
    completion = tok(" the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert item["inputs"]["input_ids"].tolist() == prompt + completion
    assert item["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + completion
    text = ds[1]
    assert text["labels"].tolist() == text["inputs"]["input_ids"].tolist()  # {text} rows train on every token
    short = build_dataset("causal_lm", split="train", root=str(root), tokenizer=tok, max_length=len(completion) + 1)
    assert short[0]["labels"].tolist() == [IGNORE_INDEX] + completion  # the prompt lost tokens, not the completion
    batch = ds.collate([ds[0], ds[1]])
    assert (batch["labels"][batch["inputs"]["attention_mask"] == 0] == IGNORE_INDEX).all()
    (root / "bad.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1 has neither 'completion'"):
        build_dataset("causal_lm", split="bad", root=str(root), tokenizer=tok)


def test_lm_loss_equals_hf_loss_and_counts_completion_tokens_only(lm_setup):
    tok, root, hf = lm_setup
    ds = build_dataset("causal_lm", split="train", root=str(root), tokenizer=tok)
    batch = ds.collate([ds[i] for i in range(3)])
    inputs, labels = batch["inputs"], batch["labels"]
    backbone = HFDecoderBackbone(hf)
    with torch.no_grad():
        logits = backbone(**inputs)
    logits.requires_grad_(True)
    ref = tiny_decoder("llama")
    ref.resize_token_embeddings(len(tok))
    ref.load_state_dict(backbone.frozen_state_dict())
    with torch.no_grad():
        hf_loss = ref(**inputs, labels=labels).loss
    loss = lm_loss(logits, labels)
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # logits at t are scored against label t + 1
    assert (logits.grad[~counted] == 0).all() and (logits.grad[counted].abs().sum(-1) > 0).all()
    preds, targets = lm_predictions(logits.detach(), labels)
    acc = compute_metrics(["token_accuracy"], preds, targets)["token_accuracy"]
    keep = targets != IGNORE_INDEX
    assert acc == pytest.approx((preds[keep] == targets[keep]).float().mean().item())
    assert TASKS.get("causal_lm").loss(logits, labels, 0.0).item() == pytest.approx(loss.item())


def test_lora_and_adapter_training_lowers_the_completion_loss(lm_setup):
    tok, root, hf = lm_setup
    ds = build_dataset("causal_lm", split="train", root=str(root), tokenizer=tok)
    batch = ds.collate([ds[i] for i in range(3)])
    torch.nn.init.normal_(hf.lm_head.weight, std=1.0)  # a random head at 0.02 caps the logits near uniform
    tuned = utuning.tune(HFDecoderBackbone(hf), [("lora", LLAMA_LINEARS, {"rank": 4}), ("p_adapter", "blocks.*", {"hidden": 16})])
    opt = torch.optim.Adam(tuned.trainable_parameters(), lr=0.05)
    losses = []
    for _ in range(25):
        loss = lm_loss(tuned(**batch["inputs"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_sequence_classification_on_a_decoder_reads_the_last_real_token(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"text": "the cat sat on the mat", "label": "a"}, {"text": "hello", "label": "b"},
            {"text": "a dog ran", "label": "a"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    hf = tiny_decoder("qwen2", "classification")
    hf.resize_token_embeddings(len(tok))
    hf.config.pad_token_id = tok.pad_token_id
    backbone = HFDecoderBackbone(hf, tokenizer=tok)
    ds = build_dataset("text_classification", split="train", root=str(tmp_path), backbone=backbone)
    assert ds.label_names == ["a", "b"]
    batch = ds.collate([ds[i] for i in range(3)])
    with torch.no_grad():
        together = backbone(**batch["inputs"])  # right-padded
        alone = torch.cat([backbone(**ds[i]["inputs"] | {"input_ids": ds[i]["inputs"]["input_ids"][None],
                                                          "attention_mask": ds[i]["inputs"]["attention_mask"][None]})
                           for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_templates_turn_a_labelled_table_into_completions(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "the cat sat", "label": "great"}) + "\n")
    ds = build_dataset("causal_lm", split="train", root=str(tmp_path), tokenizer=tok,
                       prompt_template="Review: {text}\nAnswer:", completion_template=" {label}", append_eos=False)
    item = ds[0]
    n = len(tok("Review: the cat sat\nAnswer:")["input_ids"])
    assert tok.decode(item["inputs"]["input_ids"][n:]) == " great"
    assert (item["labels"][:n] == IGNORE_INDEX).all() and (item["labels"][n:] == item["inputs"]["input_ids"][n:]).all()
    with pytest.raises(ConfigError, match="template field 'review' is not in the row"):
        build_dataset("causal_lm", split="train", root=str(tmp_path), tokenizer=tok, prompt_template="{review}")


def test_a_causal_lm_recipe_trains_through_the_engine_and_generates(tmp_path):
    """recipes/llm/lora.yaml on a tiny local model folder: utuning train, then generate_main from the checkpoint."""
    from utuning import cli
    from utuning.generate import generate_main

    tok = tiny_tokenizer()
    hf = tiny_decoder("llama")
    hf.resize_token_embeddings(len(tok))
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"text": "the cat sat on the mat", "label": "great"}, {"text": "a dog ran", "label": "other"}] * 4
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = tmp_path / "r.yaml"
    lora = Path(__file__).resolve().parents[1] / "recipes" / "llm" / "lora.yaml"
    recipe.write_text(f"""name: tiny_lm
description: tiny
defaults: [{lora}]
backbone: {{model: {tmp_path / 'model'}, args: {{gguf_file: null}}}}
data: {{root: {tmp_path}, args: {{subset: 8}}}}
train: {{batch_size: 4}}
output: {{dir: {tmp_path / 'run'}}}
""")
    assert cli.main(["train", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and set(summary["final_eval"]) >= {"loss", "token_accuracy"}
    out = generate_main(None, tmp_path / "run", "the cat", max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str)
