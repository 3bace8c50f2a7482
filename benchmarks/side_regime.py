"""Side tuners on vit_small: the tuners' defaults against the small-network regime (issue 11, item 5).

Y-Tuning (arXiv 2202.09817) reports its results at <= 2% tunable parameters; with its defaults
(every block, hidden 128) our Y-network is ~18% of vit_small, and the bypass with its default
bottleneck (64) ~5%, so both missed the side-tuner time target (<= 0.40 of full fine-tuning) on
the speed table. This section measures, side by side in one run, the defaults against:

* ``ytuning_small``: every block, hidden 32 (1.7% of vit_small);
* ``ytuning_top``: the last 3 blocks, hidden 64 (1.4%);
* ``bypass_h10``: the bypass with bottleneck 10, the value of the zoo's Res-Tuning-Bypass recipes
  (1.0%);

and the linear probe (the floor of any side tuner: the frozen forward and a head).

* **Memory**: each configuration's train step in its own child process (``benchmarks.speed``),
  peak live tensor bytes of the first step, the same in every process.
* **Time**: full fine-tuning (plain timm) and the side tuner in one process, stepped A B B A
  (``benchmarks.paired``): the median of (side ÷ full) with its interquartile range.

Accuracy at these settings is on the accuracy studies (``benchmarks.accuracy``).

Run: ``python -m benchmarks.run --full --methods side_regime`` (``results/side_regime_full.{json,md}``).
"""

from __future__ import annotations

import json
import sys

SIDES = [("linear_probe", "linear probe (head only)"),
         ("ytuning", "Y-tuning, defaults: every block, hidden 128"),
         ("ytuning_small", "Y-tuning, every block, hidden 32"),
         ("ytuning_top", "Y-tuning, last 3 blocks, hidden 64"),
         ("bypass", "bypass, default bottleneck 64"),
         ("bypass_h10", "bypass, bottleneck 10 (the zoo's recipes)")]
REFERENCE = "full_timm"
TARGET_TIME, TARGET_MEM = 0.40, 0.35


def run(job: dict) -> dict:
    from benchmarks.paired import run as paired
    from benchmarks.speed import measure

    methods = [REFERENCE] + [m for m, _ in SIDES]
    rows = measure([dict(job, family="vit", mode="train", method=m, tasks=1) for m in methods],
                   log=lambda line: print(line, file=sys.stderr))
    pairs = paired(dict(job, family="vit", tasks=1, pairs=[(REFERENCE, m, "train") for m, _ in SIDES]))
    return {"status": "ok", "rows": rows, "pairs": pairs.get("pairs", [])}


def markdown(job: dict, r: dict) -> str:
    head = ["## Side tuners: defaults against the small-network regime (issue 11)", "",
            f"{job['model']} (random weights), {job['img']}×{job['img']} images, batch {job['batch']}, fp32, "
            f"{job['threads']} torch thread(s). Memory: peak live tensor bytes of a train step, each configuration "
            "in its own process (exact). Time: full fine-tuning and the side tuner in one process, stepped "
            f"A B B A × {job['repeats']} after {job.get('warmup', 1)} warm-up step(s); the median of (side ÷ full) "
            f"with its interquartile range. Targets: time ≤ {TARGET_TIME:.2f}, memory ≤ {TARGET_MEM:.2f} of full "
            "fine-tuning.", ""]
    if r.get("status") != "ok":
        return "\n".join(head + [f"Pending: {r.get('reason')}", ""])
    if job.get("note"):
        head[-2] += " " + job["note"]
    by = {row["method"]: row for row in r["rows"] if row.get("status") == "ok"}
    times = {p["method"]: p for p in r["pairs"]}
    full = by.get(REFERENCE)
    lines = head + ["| side tuner | tunable | × full FT time (IQR) | memory (MiB) | × full FT memory | verdict |",
                    "|---|---:|---|---:|---:|---|"]
    for method, label in SIDES:
        row, t = by.get(method), times.get(method)
        if not (row and full and t):
            lines.append(f"| {label} | – | – | – | – | not measured |")
            continue
        mem = row["peak_mib"] / full["peak_mib"]
        ok = t["ratio"] <= TARGET_TIME and mem <= TARGET_MEM
        verdict = "met" if ok else ("within noise" if t["q1"] <= TARGET_TIME and mem <= TARGET_MEM else "**missed**")
        lines.append(f"| {label} (`{method}`) | {row['tunable'] / row['total']:.2%} | {t['ratio']:.3f} ({t['q1']:.3f}–{t['q3']:.3f}) | "
                     f"{row['peak_mib']:.0f} | {mem:.2f} | {verdict} |")
    if full:
        lines += ["", f"Full fine-tuning (plain timm): {full['peak_mib']:.0f} MiB, {full['median_s']:.2f} s a step "
                  "in its own process."]
    return "\n".join(lines + [""])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--markdown"]:
        stored = json.loads(open(sys.argv[2]).read())
        print(markdown(stored["job"], stored["result"]))
    else:
        print(json.dumps(run(json.loads(sys.argv[1]))))
