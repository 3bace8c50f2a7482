"""Benchmark rows for decoder LLMs (issue 13): LoRA and prefix tuning on a Llama-shaped model, ours
(``backbones/hf_decoder.py``) against Hugging Face PEFT on the same model, training and generation.

The model is a ``LlamaForCausalLM`` with random weights (nothing downloaded) of ~100 M parameters
that fits a 2-core CPU (``SHAPES``: hidden 768, 12 layers, 12 query / 4 key-value heads, SwiGLU
2048, vocabulary 32000, tied embeddings), fp32. Methods:

* ``lora`` = our LoRA (Hu et al., arXiv 2106.09685) rank 8, alpha 8 on ``blocks.*.attn.{q,v}``;
  ``peft_lora`` = ``LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])``: the same
  parameters (checked: equal counts);
* ``prefix`` = our prefix tuning (Li & Liang, arXiv 2101.00190), 10 key/value tokens in every
  attention; ``peft_prefix`` = ``PrefixTuningConfig(num_virtual_tokens=10)``. PEFT learns one
  prefix per *key-value* head (GQA: 4), ours one per *query* head (12), so ours has 3x the
  parameters on this model (the table gives both counts);
* generation: ``plain_hf`` = HF ``generate`` (greedy, its own KV cache), ``plain`` = our wrapped
  model with no tuner, ``lora`` unmerged, ``lora_merged`` (``model.merge()``), ``peft_lora``
  (PEFT's unmerged LoRA through its ``generate``); ours through ``utuning.generate.generate_ids``.

Measured, on a causal-LM step (forward, next-token cross-entropy on every token, backward, AdamW
over the trainable parameters):

* **memory**: each training configuration in its own child process; the peak of live CPU tensor
  bytes of the first step under ``torch.profiler`` (``benchmarks.speed._profiled_peak``): the same
  number in every process;
* **time**: a pair built in one process and stepped A B B A (``repeats`` times; as
  ``benchmarks.paired``), so that a shared machine's drift weighs on both sides alike; that in
  ``processes`` child processes, the build order alternated between them (a process's memory layout
  can favour one side by a few percent for its whole life, which repetitions inside it cannot
  show); the median of every repetition's (B ÷ A) pooled, with the 95% bootstrap confidence
  interval of that median and each process's own median. Generation is timed the same way, a step
  being one greedy ``generate`` call of ``new`` tokens from a ``prompt``-token prompt per row
  (prefill included); tokens per second = batch × new tokens ÷ the median call time.

Run: ``python -m benchmarks.run --full --llm [--repeats N] [--processes P]`` (``results/llm_full.json``; ``--quick --llm``: a
2-layer toy config), or a child: ``python -m benchmarks.llm '<job json>'``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.methods import Built, Unavailable, _count
from benchmarks.paired import VERDICT_RULE, cell, time_verdict
from benchmarks.report import MIN_CPU_SHARE

LLAMA_100M = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
              "intermediate_size": 2048, "vocab_size": 32000, "tie_word_embeddings": True,
              "max_position_embeddings": 2048}
LLAMA_TOY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": True,
             "max_position_embeddings": 256}
#: Shapes per mode: train on ``batch`` x ``seq`` tokens; generate ``new`` tokens after ``prompt`` tokens.
SHAPES = {"quick": {"config": LLAMA_TOY, "batch": 2, "seq": 16, "prompt": 8, "new": 4, "warmup": 1, "iters": 1,
                    "repeats": 1},
          "full": {"config": LLAMA_100M, "batch": 2, "seq": 64, "prompt": 16, "new": 16, "warmup": 1, "iters": 1,
                   "repeats": 3}}
PROCESSES = {"quick": 1, "full": 4}
TRAIN = ["lora", "peft_lora", "prefix", "peft_prefix"]
#: (A, B, mode, what B ÷ A says)
PAIRS = [("lora", "lora_again", "train", "A/A control: ours ÷ ours, the same LoRA model built twice"),
         ("peft_lora", "lora", "train", "ours ÷ PEFT, LoRA q,v r=8"),
         ("peft_prefix", "prefix", "train", "ours ÷ PEFT, prefix 10 tokens"),
         ("plain_hf", "plain", "generate", "our untuned wrapper ÷ HF generate"),
         ("plain_hf", "lora_merged", "generate", "ours, merged LoRA ÷ HF generate"),
         ("lora_merged", "lora", "generate", "unmerged ÷ merged LoRA: the per-token cost of an unmerged tuner"),
         ("plain_hf", "peft_lora", "generate", "PEFT unmerged LoRA ÷ HF generate"),
         ("peft_lora", "lora", "generate", "ours ÷ PEFT, unmerged LoRA")]
LORA = ("lora", "blocks.*.attn.{q,v}", {"rank": 8, "alpha": 8})
PREFIX = ("prefix", "blocks.*.attn", {"tokens": 10})


class LMBuilt(Built):
    """A causal-LM configuration: ``labels`` are the input ids, the loss predicts token t + 1 at t."""

    def loss(self, out) -> Tensor:
        logits = out.logits if hasattr(out, "logits") else out  # (B, N, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), self.labels[:, 1:].flatten())


def hf_model(job: dict):
    """The random-weight ``LlamaForCausalLM`` of ``job['config']`` (seeded: every build is the same model)."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**job["config"])).eval()


def _ours(job: dict) -> tuple:
    import utuning
    from utuning.backbones.hf_decoder import HFDecoderBackbone

    method = job["method"]
    specs = {"plain": [], "lora": [LORA], "lora_again": [LORA], "lora_merged": [LORA], "prefix": [PREFIX]}[method]
    model = utuning.tune(HFDecoderBackbone(hf_model(job)), specs)
    if method == "lora_merged":
        model.merge()
    return model, model.trainable_parameters()


def _peft(job: dict) -> tuple:
    import peft
    import transformers
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    if job["method"] == "peft_lora":
        config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                            task_type="CAUSAL_LM")
    else:
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
    try:
        model = get_peft_model(hf_model(job), config)
        with torch.no_grad():
            model(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4, dtype=torch.long))
    except (ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise Unavailable(f"PEFT {peft.__version__} cannot run {type(config).__name__} on transformers "
                          f"{transformers.__version__}: {err}") from None
    return model, [p for p in model.parameters() if p.requires_grad]


def _plain_hf(job: dict) -> tuple:
    return hf_model(job), []


BUILDERS: dict[str, Callable[[dict], tuple]] = {"plain_hf": _plain_hf, "plain": _ours, "lora": _ours, "lora_again": _ours,
                                                "lora_merged": _ours, "prefix": _ours, "peft_lora": _peft,
                                                "peft_prefix": _peft}


def build(job: dict) -> LMBuilt:
    """One configuration: the model, a (batch, seq) batch of random token ids and the trainable parameters."""
    model, trainable = BUILDERS[job["method"]](job)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, job["config"]["vocab_size"], (job["batch"], job["seq"]), generator=g)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    return LMBuilt(model, kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels=ids,
                   trainable=trainable, total=_count(model))


def generate_step(job: dict) -> tuple[Callable[[], Tensor], LMBuilt]:
    """One greedy generation of ``job['new']`` tokens (no end-of-sequence stop) from a batch of
    ``job['prompt']``-token prompts: ours through ``generate_ids``, HF / PEFT through ``generate``."""
    from utuning.generate import generate_ids

    built = build(dict(job, seq=job["prompt"]))
    ids, mask = built.kwargs["input_ids"], built.kwargs["attention_mask"]
    model, n = built.model.eval(), job["new"]
    if job["method"] in ("plain_hf", "peft_lora"):
        def step() -> Tensor:  # (B, new)
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    else:
        def step() -> Tensor:  # (B, new)
            return generate_ids(model, ids, mask, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return step, built


def train_step(job: dict) -> tuple[Callable[[], object], LMBuilt]:
    from benchmarks.speed import make_step

    built = build(job)
    return make_step(built, dict(job, mode="train")), built


def memory_row(job: dict) -> dict:
    """A training configuration in this process: its first step's tensor-byte peak (profiled), then
    ``iters`` timed steps (kept in the JSON, not used for ratios: the paired timings are)."""
    from benchmarks.speed import _profiled_peak

    load_start = os.getloadavg()[0]
    try:
        step, built = train_step(job)
    except Unavailable as err:
        return {"status": "skipped", "reason": str(err)}
    peak = _profiled_peak(step)
    times = []
    for _ in range(job["iters"]):  # the profiled step was the warm-up
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"status": "ok", "peak_mib": peak / 2**20, "median_s": statistics.median(times), "times_s": times,
            "tunable": sum(p.numel() for p in built.trainable), "total": built.total,
            "weights_mib": sum(p.numel() * p.element_size() for p in built.model.parameters()) / 2**20,
            "threads": torch.get_num_threads(), "cores": os.cpu_count(), "load": [load_start, os.getloadavg()[0]]}


def paired(job: dict) -> dict:
    """Each pair of ``job['pairs']`` built in this process (B before A when ``job['reverse']``) and
    stepped A B B A x ``repeats`` after ``warmup`` steps of each: ``benchmarks.paired.abba``'s ratios
    (B time ÷ A time), their median, quartiles and confidence interval, the step times. Generation
    pairs also record whether both sides produced the same greedy tokens."""
    from benchmarks.paired import abba, contention

    out = []
    for ref, other, mode, _ in job["pairs"]:
        load_start = os.getloadavg()[0]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        make = generate_step if mode == "generate" else train_step
        order = (other, ref) if job.get("reverse") else (ref, other)
        try:
            steps = {m: make(dict(job, method=m))[0] for m in order}
        except Unavailable as err:
            out.append({"ref": ref, "method": other, "mode": mode, "status": "skipped", "reason": str(err)})
            continue
        tokens = {m: steps[m]() for m in order}  # also the warm-up
        for _ in range(job["warmup"] - 1):
            steps[ref](), steps[other]()
        row = {"ref": ref, "method": other, "mode": mode, "status": "ok",
               **abba(steps, ref, other, job["repeats"], quantiles="inclusive"),
               "load": [load_start, os.getloadavg()[0]], **contention(wall0, cpu0, torch.get_num_threads())}
        if mode == "generate":
            row["same_tokens"] = bool(torch.equal(tokens[ref], tokens[other]))
        out.append(row)
        del steps, tokens
    return {"status": "ok", "pairs": out}


def pooled(parts: list[dict]) -> dict:
    """The ``paired`` results of several processes, one row per pair: the repetitions pooled
    (``benchmarks.paired.pool``), the loads' range, the lowest CPU share, tokens equal in all."""
    from benchmarks.paired import pool

    failed = [p for p in parts if p.get("status") != "ok"]
    if failed:
        return failed[0]
    out = []
    for rows in zip(*(p["pairs"] for p in parts)):
        ok = [r for r in rows if r.get("status") == "ok"]
        if len(ok) < len(rows):
            out.append(next(r for r in rows if r.get("status") != "ok"))
            continue
        row = {k: rows[0][k] for k in ("ref", "method", "mode")}
        row.update(status="ok", **pool(ok, quantiles="inclusive"),
                   load=[min(x for r in ok for x in r["load"]), max(x for r in ok for x in r["load"])],
                   cpu_share=min(r["cpu_share"] for r in ok), affinity=ok[0]["affinity"], threads=ok[0]["threads"])
        if "same_tokens" in ok[0]:
            row["same_tokens"] = all(r["same_tokens"] for r in ok)
        out.append(row)
    return {"status": "ok", "pairs": out, "processes": len(parts)}


def run_llm(mode: str, out: Path, *, threads: int, repeats: int | None = None, processes: int | None = None) -> Path:
    """Memory rows (one child process per training configuration), then the paired timings
    (``processes`` children, alternating the build order, pooled); writes and returns
    ``results/llm_<mode>.json``."""
    from benchmarks.speed import run_child

    shape = {**SHAPES[mode], **({"repeats": repeats} if repeats else {})}
    base = {"family": "llm", "threads": threads, **shape, "processes": processes or PROCESSES[mode]}
    start = time.time()
    rows = []
    for method in TRAIN:
        result = run_child("benchmarks.llm", dict(base, kind="memory", method=method), timeout=3600)
        rows.append({"method": method, **result})
        print(f"llm memory {method}: {result.get('peak_mib', result.get('reason'))}")
    parts = []
    for i in range(base["processes"]):
        parts.append(run_child("benchmarks.llm", dict(base, kind="paired", pairs=PAIRS, reverse=i % 2 == 1),
                               timeout=3600))
        print(f"llm paired, process {i + 1} of {base['processes']}: {parts[-1].get('status')} "
              f"{parts[-1].get('reason', '')}")
    record = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(start)),
              "wall_s": time.time() - start, "job": base, "rows": rows, "paired": pooled(parts),
              "versions": _versions()}
    path = Path(out) / "results" / f"llm_{mode}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


# The page ---------------------------------------------------------------------------------
def _per_process(p: dict | None) -> str:
    ratios = (p or {}).get("process_ratios") or []
    return ", ".join(f"{r:.3f}" for r in ratios) if len(ratios) > 1 else ""


def train_table(record: dict) -> list[str]:
    rows = {r["method"]: r for r in record["rows"]}
    pairs = {(p["ref"], p["method"]): p for p in record["paired"].get("pairs", []) if p["mode"] == "train"}
    lines = ["| method | tunable, ours / PEFT | peak step memory, ours / PEFT (MiB) | ours ÷ PEFT memory "
             "| ours ÷ PEFT step time (paired, 95% CI) | per process | memory ≤ PEFT | time ≤ PEFT |",
             "|---|---|---|---:|---:|---|---|---|"]
    for ours, label in (("lora", "LoRA q, v rank 8"), ("prefix", "prefix, 10 tokens")):
        a, b, p = rows.get(ours, {}), rows.get("peft_" + ours, {}), pairs.get(("peft_" + ours, ours))
        if a.get("status") != "ok" or b.get("status") != "ok":
            bad = a if a.get("status") != "ok" else b
            lines.append(f"| {label} | | | | | | {bad.get('status', 'missing')}: {str(bad.get('reason', ''))[:160]} | |")
            continue
        mem = a["peak_mib"] / b["peak_mib"]
        lines.append(f"| {label} | {a['tunable']:,} / {b['tunable']:,} | {a['peak_mib']:.0f} / {b['peak_mib']:.0f} | "
                     f"{mem:.3f} | {cell(p)} | {_per_process(p)} | {'met' if mem <= 1.0 else '**missed**'} | "
                     f"{time_verdict(p)} |")
    control = pairs.get(("lora", "lora_again"))
    if control and control.get("status") == "ok":
        lines += ["", f"A/A control, the same LoRA model built twice and timed the same way (ours ÷ ours): "
                  f"{cell(control)}" + (f" (per process {_per_process(control)})" if _per_process(control) else "")
                  + ": what the measurement gives for identical arithmetic, against which the ratios above are read."]
    return lines


def generate_table(record: dict) -> list[str]:
    job = record["job"]
    tokens = job["batch"] * job["new"]
    lines = ["| A | B | A tokens/s | B tokens/s | B ÷ A time per generated token (paired, 95% CI) | per process "
             "| same greedy tokens | what it says |", "|---|---|---:|---:|---:|---|---|---|"]
    notes = {(a, b): note for a, b, _, note in PAIRS}
    for p in record["paired"].get("pairs", []):
        if p["mode"] != "generate":
            continue
        if p.get("status") != "ok":
            lines.append(f"| {p['ref']} | {p['method']} | | | {p.get('status')}: {p.get('reason', '')} | | | |")
            continue
        lines.append(f"| {p['ref']} | {p['method']} | {tokens / p['ref_s']:.1f} | {tokens / p['method_s']:.1f} | "
                     f"{cell(p)} | {_per_process(p)} | {'yes' if p.get('same_tokens') else 'no'} | {notes.get((p['ref'], p['method']), '')} |")
    return lines


def _loads(record: dict) -> list[float]:
    return [x for r in record["rows"] for x in r.get("load", [])] + \
        [x for p in record["paired"].get("pairs", []) for x in p.get("load", [])]


def markdown(record: dict) -> list[str]:
    """The page's "Decoder LLMs" section for one ``results/llm_<mode>.json`` record."""
    job, cfg = record["job"], record["job"]["config"]
    total = next((r["total"] for r in record["rows"] if r.get("status") == "ok"), None)
    loads, cores = _loads(record), os.cpu_count() or 1
    shares = [p["cpu_share"] for p in record["paired"].get("pairs", []) if p.get("cpu_share") is not None]
    # A pinned run measures its own share of its cores; the load average also counts other cores' work.
    busy = min(shares) < MIN_CPU_SHARE if shares else bool(loads) and max(loads) > cores + 1
    if shares:
        loads_note = (f"; each pair's process had {min(shares):.2f}–{max(shares):.2f} of its cores' time "
                      "(CPU ÷ wall × threads; the run was pinned to its own core, other work to the other)")
    else:
        loads_note = ""
    v = record.get("versions", {})
    head = [
        "## Decoder LLMs: LoRA and prefix tuning on a Llama-shaped model, ours vs HF PEFT", "",
        f"`LlamaForCausalLM` with random weights, {total / 1e6:.1f} M parameters" if total else "`LlamaForCausalLM`",
        f"(hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} query / "
        f"{cfg['num_key_value_heads']} key-value heads, SwiGLU {cfg['intermediate_size']}, vocabulary "
        f"{cfg['vocab_size']}, tied embeddings), fp32, {job['threads']} torch thread{'s' if job['threads'] != 1 else ''} on CPU; transformers "
        f"{v.get('transformers', '?')}, PEFT {v.get('peft', '?')}. Train step: batch {job['batch']} × "
        f"{job['seq']} tokens, forward, next-token cross-entropy, backward, AdamW. Generation: greedy, "
        f"{job['new']} new tokens after a {job['prompt']}-token prompt, batch {job['batch']}, KV cache "
        "(ours: `utuning.generate.generate_ids`; HF / PEFT: `generate`), prefill included. "
        "Memory: peak live tensor bytes of one train step, each configuration in its own process (exact). "
        f"Time: both sides in one process, stepped A B B A × {job['repeats']} after {job['warmup']} warm-up "
        f"step(s), in {job.get('processes', 1)} process(es) (build order alternated between them); the median of "
        "every repetition's (B ÷ A), with the 95% bootstrap confidence interval of that median, and each "
        f"process's own median. {VERDICT_RULE} PEFT's prefix learns one prefix per "
        "key-value head (GQA), ours one per query head, hence 3× the parameters here. "
        f"Run started {record['started']}, took {record['wall_s'] / 60:.1f} min; 1-minute load average "
        f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} on {cores} cores{loads_note}"
        + (": **the machine was oversubscribed by other work: the time ratios are noisy, read their "
           "confidence intervals; memory is exact**." if busy else "."), ""]
    if record["paired"].get("status") != "ok":
        head += [f"Paired timings failed: {record['paired'].get('reason')}", ""]
    return head + ["### Training", ""] + train_table(record) + ["", "### Generation", ""] + generate_table(record) + [""]


def section(out: Path, mode: str) -> list[str]:
    """What ``benchmarks.report.write_page`` adds to the page (nothing before a run)."""
    path = Path(out) / "results" / f"llm_{mode}.json"
    return markdown(json.loads(path.read_text())) if path.exists() else []


def main(job: dict) -> dict:
    torch.set_num_threads(int(job.get("threads") or 1))
    return memory_row(job) if job["kind"] == "memory" else paired(job)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
