"""The benchmark's quick mode (the CI check of issue 5): one command writes the results page,
the plots and the JSON results, and every ratio on it is a finite number."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import report, run


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert run.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    return out


def test_quick_mode_writes_page_plots_and_results(quick):
    page = (quick / "README.md").read_text()
    assert "## vit_small_patch16_224" in page and "## bert-base" in page
    assert "Quick mode" in page
    pngs = sorted((quick / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    records = [json.loads(p.read_text()) for p in (quick / "results").glob("speed_quick_*.json")]
    assert {r["model"] for r in records} == {"vit_small_patch16_224", "bert-base"}
    cache = json.loads((quick / "results" / "cache_quick.json").read_text())["result"]
    assert cache["status"] == "ok" and set(cache["sides"]) == {"bypass", "ytuning", "ytuning_small", "ytuning_top", "linear_probe"}
    assert all(math.isfinite(q["cached_over_first"]) and 0 < q["cached_over_first"] for q in cache["sides"].values())
    assert "## Epochs from cached features" in page and "| linear_probe |" in page
    pairs = json.loads((quick / "results" / "paired_quick.json").read_text())["result"]
    assert pairs["status"] == "ok", pairs
    assert all(math.isfinite(p["ratio"]) and p["ratio"] > 0 for p in pairs["pairs"])
    assert {(p["ref"], p["method"]) for p in pairs["pairs"]} >= {("plain_timm", "peft_lora_merged"),
                                                                 ("plain_timm", "lora_merged")}
    assert "## Paired timings" in page


def test_quick_mode_ratios_are_finite(quick):
    for record in report.load(quick, "quick"):
        failed = [(r["method"], r.get("reason")) for r in record["rows"] if r["status"] == "error"]
        assert not failed, failed
        ratios = report.ratios(record)
        assert ratios, record["model"]
        values = [v for d in ratios.values() for v in d.values()]
        assert values and all(math.isfinite(v) and v > 0 for v in values), ratios
        for r in record["rows"]:
            if r["status"] == "ok":
                assert r["median_s"] > 0 and r["peak_mib"] >= 0 and 0 < r["tunable"] <= r["total"]


def test_full_mode_jobs_cover_the_issue():
    small = {(j["mode"], j["method"]) for j in run.jobs_for("full", "vit_small_patch16_224", threads=2,
                                                             device="cpu", overrides={})}
    assert ("train", "full_timm") in small and ("infer", "lora_merged") in small
    assert {("train", m) for m in ("ytuning", "bypass", "peft_lora", "peft_ia3", "ia3", "vpt_deep", "prefix")} <= small
    assert all(j["batch"] == 32 and j["img"] == 224 for j in run.jobs_for("full", "vit_base_patch16_224", threads=2,
                                                                          device="cpu", overrides={}))


def test_partial_runs_replace_their_rows_and_keep_the_others():
    def row(method, mode="train", tasks=1, t=1.0):
        return {"method": method, "mode": mode, "tasks": tasks, "median_s": t}

    stored = {"mode": "full", "model": "m", "started": "a", "wall_s": 10.0,
              "rows": [row("full_timm"), row("lora"), row("lora", "infer"), row("bypass", tasks=3)]}
    new = {"mode": "full", "model": "m", "started": "b", "wall_s": 2.0, "rows": [row("lora", t=2.0), row("ia3")]}
    merged = run.merge(stored, new)
    assert [(r["method"], r["mode"], r["tasks"], r["median_s"]) for r in merged["rows"]] == [
        ("full_timm", "train", 1, 1.0), ("lora", "train", 1, 2.0), ("lora", "infer", 1, 1.0),
        ("bypass", "train", 3, 1.0), ("ia3", "train", 1, 1.0)]
    assert merged["rows"][1]["started"] == "b" and "started" not in merged["rows"][0]
    assert [r["methods"] for r in merged["runs"]] == ["all", ["lora", "ia3"]]


def test_rounds_pool_the_steps_and_keep_each_round():
    def row(method, times, peak, status="ok"):
        return {"method": method, "mode": "train", "tasks": 1, "status": status, "times_s": times,
                "median_s": sorted(times)[len(times) // 2], "peak_mib": peak, "load": [0.5, 0.7]}

    first = [row("full_timm", [1.0, 1.2, 1.1], 100.0), row("lora", [0.7, 0.8, 0.6], 80.0)]
    second = [row("full_timm", [1.3, 1.4, 1.5], 120.0), row("lora", [0.9, 0.7, 0.8], 60.0, status="error")]
    pooled = run.combine([first, second])
    assert pooled[0]["median_s"] == 1.25 and pooled[0]["peak_mib"] == 110.0 and len(pooled[0]["times_s"]) == 6
    assert [r["median_s"] for r in pooled[0]["rounds"]] == [1.1, 1.4]
    assert pooled[1]["status"] == "error"  # a failure in any round is not averaged away


def test_full_mode_times_more_forwards_than_train_steps():
    jobs = run.jobs_for("full", "vit_small_patch16_224", threads=2, device="cpu", overrides={"iters": 3})
    assert {j["iters"] for j in jobs if j["mode"] == "train"} == {3}
    assert {j["iters"] for j in jobs if j["mode"] == "infer"} == {3 * run.INFER_ITERS_FACTOR}


# Other vision families (issue 12: benchmarks.families) ----------------------------------------
def _family_job(key: str, method: str, mode: str = "train", img: int = 32) -> dict:
    return {"family": "arch", "model": key, "method": method, "mode": mode, "batch": 2, "img": img, "classes": 3,
            "tasks": 1}


@pytest.mark.parametrize("key,img", [("convnext_atto", 32), ("eva02_tiny_patch14_224", 28)])
def test_family_jobs_train_only_their_tuners_and_the_untuned_wrapper_is_the_plain_model(key, img):
    import torch

    from benchmarks.methods import build

    built = {}
    for method, mode in [("full_timm", "train"), ("dual_u_tuner", "train"), ("lora", "train"), ("plain_timm", "infer"),
                         ("plain", "infer")]:
        torch.manual_seed(0)
        built[method] = build(_family_job(key, method, mode, img))
    full = built["full_timm"]
    assert len(full.trainable) == len(list(full.model.parameters())) and full.total == sum(p.numel() for p in full.trainable)
    for method in ("dual_u_tuner", "lora"):
        b = built[method]
        names = {n for n, p in b.model.named_parameters() if p.requires_grad}
        assert b.trainable and 0 < sum(p.numel() for p in b.trainable) < full.total / 10, method
        assert names and all(".tuners." in n for n in names), names  # the tuners' (and the new head's) own
        b.loss(b.forward()).backward()  # gradients reach the tuner parameters only
        assert all(p.grad is not None for p in b.trainable)
        assert all(p.grad is None for p in b.model.parameters() if not p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(built["plain"].model(built["plain_timm"].args[0]),
                                   built["plain_timm"].model(built["plain_timm"].args[0]), rtol=1e-4, atol=1e-5)


def test_unknown_family_is_a_clear_error(tmp_path):
    from benchmarks.families import run_families
    from utuning.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="convnext_atto"):
        run_families("quick", tmp_path, ["convnext_ato"], threads=1, device="cpu", overrides={})


def test_families_section_reports_paired_times_memory_and_the_inference_verdict():
    from benchmarks import families

    def row(method, mode, t, mib, tunable, load=(1.0, 1.5)):
        return {"family": "arch", "model": "convnext_atto", "method": method, "mode": mode, "tasks": 1, "status": "ok",
                "median_s": t, "peak_mib": mib, "tunable": tunable, "total": 1000, "img": 112, "batch": 4,
                "threads": 2, "device": "cpu", "cores": 2, "load": list(load)}

    def pair(method, ratio, q1, q3, mode="train"):
        return {"ref": "plain_timm" if mode == "infer" else "full_timm", "method": method, "mode": mode,
                "ratio": ratio, "q1": q1, "q3": q3}

    def record(key, load, plain):
        rows = [row("full_timm", "train", 2.0, 100.0, 1000, load), row("dual_u_tuner", "train", 1.0, 20.0, 10, load),
                row("lora", "train", 1.5, 40.0, 20, load), row("plain_timm", "infer", 0.5, 1.0, 1000, load),
                row("plain", "infer", 0.51, 1.0, 0, load)]
        paired = {"status": "ok", "load": list(load), "pairs": [pair("dual_u_tuner", 0.45, 0.4, 0.5),
                                                                  pair("lora", 0.7, 0.6, 0.8), pair("plain", *plain, "infer")]}
        return {"mode": "full", "model": key, "started": "x", "wall_s": 60.0, "rows": rows,
                "paired": {"job": {"repeats": 3}, "result": paired}}

    calm = record("convnext_atto", (1.0, 1.5), (1.01, 1.0, 1.015))
    busy = record("swin_tiny_patch4_window7_224", (1.0, 9.0), (1.03, 1.01, 1.05))
    page = "\n".join(families.markdown([calm, busy]))
    assert "| ConvNeXt-Atto (0.0 M) | 1.00% | 0.45 (0.40–0.50 IQR) | 0.20 | 2.00% | 0.70 (0.60–0.80 IQR) | 0.40 | " \
           "1.01 (1.00–1.01 IQR) | met |" in page  # a range entirely at or under 1.02
    assert "| 1.03 (1.01–1.05 IQR) | no verdict (oversubscribed) |" in page
    spanning = record("convnext_atto", (1.0, 1.5), (1.03, 1.01, 1.05))
    assert "| within noise |" in "\n".join(families.summary_table([spanning]))
    assert "oversubscribed" in page and "1.0–9.0 on 2 cores" in page
    calm_rows = "\n".join(families.detail_table(calm))
    busy_rows = "\n".join(families.detail_table(busy))
    assert "| train | dual_u_tuner | 1.00% | 1.000 | 0.50 | 20 | 0.20 |" in calm_rows
    assert "| train | dual_u_tuner | 1.00% | 1.000 | – | 20 | 0.20 |" in busy_rows  # per-process time withheld
    missed = record("convnext_atto", (1.0, 1.5), (1.10, 1.05, 1.2))
    assert "**missed**" in "\n".join(families.summary_table([missed]))
