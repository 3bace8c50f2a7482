"""The decoder-LLM benchmark harness (``benchmarks/llm.py``) on a micro Llama, in this process: ours and
PEFT's LoRA train the same parameter count, the generation pairs produce the same greedy tokens (the
timed calls compute what they claim to), and the page section renders verdicts from a record."""

from __future__ import annotations

import torch

from benchmarks.llm import PAIRS, build, generate_step, markdown, paired

MICRO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64, "vocab_size": 97, "tie_word_embeddings": True, "max_position_embeddings": 64}
JOB = {"family": "llm", "config": MICRO, "batch": 2, "seq": 8, "prompt": 5, "new": 3, "warmup": 1, "iters": 1,
       "repeats": 1, "threads": 1}


def test_lora_counts_match_peft_and_prefix_follows_the_heads():
    counts = {m: sum(p.numel() for p in build(dict(JOB, method=m)).trainable)
              for m in ("lora", "peft_lora", "prefix", "peft_prefix")}
    assert counts["lora"] == counts["peft_lora"] == 2 * 8 * ((32 + 32) + (32 + 16))  # layers x r x (q: D + D, v: D + kv width)
    assert counts["prefix"] == 2 * 2 * 10 * 32  # per query head: layers x {k, v} x tokens x D
    assert counts["peft_prefix"] == 2 * 2 * 10 * 16  # per key-value head (GQA 2 of 4)


def test_train_step_loss_is_next_token_cross_entropy():
    built = build(dict(JOB, method="peft_lora"))
    out = built.forward()
    ref = built.model(**built.kwargs, labels=built.labels).loss  # HF's own shifted causal-LM loss
    torch.testing.assert_close(built.loss(out), ref)


def test_paired_generation_and_training_and_the_page():
    pairs = [p for p in PAIRS if p[:2] in {("plain_hf", "plain"), ("lora_merged", "lora"), ("peft_lora", "lora")}]
    result = paired(dict(JOB, pairs=pairs))
    assert result["status"] == "ok" and len(result["pairs"]) == 4  # peft_lora/lora: train and generate
    by = {(p["ref"], p["method"], p["mode"]): p for p in result["pairs"]}
    assert [p["same_tokens"] for k, p in by.items() if k[2] == "generate"] == [True] * 3
    train = by[("peft_lora", "lora", "train")]
    assert train["ratio"] > 0 and train["q1"] <= train["ratio"] <= train["q3"]
    step, _ = generate_step(dict(JOB, method="plain"))
    assert step().shape == (2, 3)

    by[("peft_lora", "lora", "generate")].update(ratio=9.99, q1=9.99, q3=9.99, ci=[9.99, 9.99])  # not the train pair
    rows = [{"method": "lora", "status": "ok", "peak_mib": 10.0, "tunable": 8, "total": 100},
            {"method": "peft_lora", "status": "ok", "peak_mib": 12.0, "tunable": 8, "total": 100},
            {"method": "prefix", "status": "ok", "peak_mib": 9.0, "tunable": 4, "total": 100},
            {"method": "peft_prefix", "status": "skipped", "reason": "PEFT x cannot run PrefixTuningConfig"}]
    record = {"job": JOB, "rows": rows, "paired": result, "started": "now", "wall_s": 60.0, "versions": {}}
    page = "\n".join(markdown(record))
    lora_row = next(line for line in page.splitlines() if line.startswith("| LoRA q, v rank 8 | 8 / 8 | 10 / 12 | 0.833 |"))
    lo, hi = train["ci"]
    assert f"{train['ratio']:.3f} ({lo:.3f}–{hi:.3f})" in lora_row  # the train pair, not generate's
    assert "skipped: PEFT x cannot run PrefixTuningConfig" in page
    assert "unmerged ÷ merged LoRA" in page


def test_processes_alternate_the_build_order_and_pool_their_repetitions():
    from benchmarks.llm import pooled

    pairs = [p for p in PAIRS if p[:2] in {("peft_lora", "lora"), ("lora_merged", "lora")}]
    parts = [paired(dict(JOB, pairs=pairs, repeats=2, reverse=reverse)) for reverse in (False, True)]
    result = pooled(parts)
    assert result["processes"] == 2 and [(p["ref"], p["method"], p["mode"]) for p in result["pairs"]] == \
        [(p["ref"], p["method"], p["mode"]) for p in parts[0]["pairs"]]
    for i, row in enumerate(result["pairs"]):
        assert row["ratios"] == parts[0]["pairs"][i]["ratios"] + parts[1]["pairs"][i]["ratios"]  # B ÷ A in both orders
        assert row["process_ratios"] == [parts[0]["pairs"][i]["ratio"], parts[1]["pairs"][i]["ratio"]]
        assert row["ci"][0] <= row["ratio"] <= row["ci"][1]
    assert [r["same_tokens"] for r in result["pairs"] if r["mode"] == "generate"] == [True, True]
    parts[1]["pairs"][1]["same_tokens"] = False  # one process's tokens differ: the pooled row says so
    assert pooled(parts)["pairs"][1]["same_tokens"] is False
    record = {"job": dict(JOB, processes=2), "rows": [], "paired": result, "started": "now", "wall_s": 1.0,
              "versions": {}}
    page = "\n".join(markdown(record))
    per = ", ".join(f"{r:.3f}" for r in result["pairs"][1]["process_ratios"])
    assert f"| {per} | yes |" in page and "in 2 process(es)" in page
    failed = {"status": "failed", "reason": "child crashed"}
    assert pooled([parts[0], failed]) is failed
