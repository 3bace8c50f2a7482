"""``utuning report --tables``: seeds aggregated, paper-format tables, Markdown, CSV and plots."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from utuning import cli
from utuning.data.vtab import GROUPS, VTAB_TASKS
from utuning.errors import ConfigError
from utuning.report import aggregate, collect, format_csv, format_markdown, paper_tables

TUNERS = {"lora": [{"name": "lora", "at": "blocks.*.attn.qkv"}], "vpt": [{"name": "vpt_deep", "at": "blocks.*"}]}


def fake_run(root: Path, method: str, data: str, seed: int, acc: float, *, tunable: int = 300_000,
             lr: float = 1e-3, task: str | None = None) -> Path:
    """A finished run folder: resolved recipe.yaml and summary.json, as ``utuning train`` writes them."""
    name = f"{method}_{data}{task or ''}_lr{lr}_s{seed}"
    run = root / name
    run.mkdir(parents=True)
    recipe = {"name": name, "tuners": TUNERS[method] + [{"name": "linear_probe", "at": "head"}],
              "data": {"name": data, "args": {"task": task} if task else {}}, "optim": {"lr": lr},
              "train": {"seed": seed, "epochs": 100}, "output": {"dir": str(run)}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    summary = {"name": name, "tunable_params": tunable, "total_params": 86_000_000,
               "best_eval": {"step": 9, "epoch": 9, "metrics": {"accuracy": acc + 0.01, "loss": 0.5}},
               "final_eval": {"accuracy": acc, "loss": 0.6}, "train_time_s": 1.0}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def accuracy(method: str, index: int, seed: int) -> float:
    return 0.30 + 0.03 * index + (0.05 if method == "lora" else 0.0) + 0.01 * seed


def vtab_runs(root: Path, seeds=(0, 1, 2)) -> None:
    for method in ("lora", "vpt"):
        for i, task in enumerate(VTAB_TASKS):
            for seed in seeds:
                fake_run(root, method, f"vtab_{task}", seed, accuracy(method, i, seed),
                         tunable=300_000 if method == "lora" else 500_000 + 1000 * i)


def test_seeds_aggregate_to_mean_sample_std_and_n(tmp_path: Path) -> None:
    for seed, acc in enumerate([0.70, 0.74, 0.75]):
        fake_run(tmp_path, "lora", "cifar100", seed, acc)
    fake_run(tmp_path, "lora", "cifar100", 0, 0.10, lr=0.1)  # another configuration: its own group
    for seed, status in ((7, "interrupted"), (8, "diverged")):  # seeds of the same configuration, not results
        run = fake_run(tmp_path, "lora", "cifar100", seed, 0.99)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "status": status}))
    groups = aggregate(collect(tmp_path))
    assert sorted(g["n"] for g in groups) == [1, 3]
    main = next(g for g in groups if g["n"] == 3)
    assert main["mean"] == pytest.approx(statistics.mean([0.70, 0.74, 0.75]))
    assert main["std"] == pytest.approx(statistics.stdev([0.70, 0.74, 0.75]))
    assert main["seeds"] == [0, 1, 2] and main["dataset"] == "cifar100" and main["method"] == "lora"
    assert aggregate(collect(tmp_path), value="best")[0]["mean"] == pytest.approx(main["mean"] + 0.01)
    single = next(g for g in groups if g["n"] == 1)
    assert single["std"] is None and single["mean"] == pytest.approx(0.10)
    with pytest.raises(ConfigError, match="two configurations"):
        paper_tables(groups)


def test_vtab_table_has_group_means_and_both_overall_means(tmp_path: Path) -> None:
    vtab_runs(tmp_path)
    (table,) = paper_tables(aggregate(collect(tmp_path)))
    assert table["title"] == "VTAB-1k" and table["n"] == 3
    header = table["header"]
    assert header[:3] == ["Method", "Params (M)", "CIFAR-100"] and header[-5:] == [
        "Natural", "Specialized", "Structured", "Mean (19 tasks)", "Mean (group means)"]
    row = next(r for r in table["rows"] if r["method"] == "vpt_deep")
    per_task = [100 * statistics.mean(accuracy("vpt", i, s) for s in (0, 1, 2)) for i in range(19)]
    groups = [statistics.mean(v for v, t in zip(per_task, VTAB_TASKS) if VTAB_TASKS[t][1] == g) for g in GROUPS]
    assert [c[0] for c in row["cells"][:19]] == pytest.approx(per_task)
    assert row["cells"][0][1] == pytest.approx(100 * statistics.stdev([accuracy("vpt", 0, s) for s in (0, 1, 2)]))
    assert [c[0] for c in row["cells"][19:22]] == pytest.approx(groups)
    assert row["cells"][22][0] == pytest.approx(statistics.mean(per_task))
    assert row["cells"][23][0] == pytest.approx(statistics.mean(groups))
    assert abs(row["cells"][22][0] - row["cells"][23][0]) > 0.5  # the two means differ and both are shown
    assert row["params_m"] == pytest.approx(0.5 + 0.009)  # mean over the 19 tasks, in millions
    text = format_markdown([table])
    assert "| vpt_deep | 0.51 |" in text and "over 3 seed(s)" in text and "Mean (group means)" in text


def test_a_missing_task_leaves_the_means_empty(tmp_path: Path) -> None:
    vtab_runs(tmp_path, seeds=(0,))
    for run in tmp_path.glob("lora_vtab_dtd*"):
        (run / "summary.json").unlink()  # not finished
    (table,) = paper_tables(aggregate(collect(tmp_path)))
    lora = next(r for r in table["rows"] if r["method"] == "lora")
    assert lora["cells"][2] is None and lora["cells"][19] is None and lora["cells"][-1] is None
    assert lora["cells"][20] is not None  # Specialized is complete
    assert "| lora |" in format_markdown([table]) and table["rows"][1]["cells"][-1] is not None


def test_cifar_fgvc_glue_and_other_tables_csv_and_plots(tmp_path: Path, capsys) -> None:
    fgvc = ["cub200", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"]
    for seed in (0, 1):
        fake_run(tmp_path, "lora", "cifar100", seed, 0.9 + 0.01 * seed)
        for i, name in enumerate(fgvc):
            fake_run(tmp_path, "lora", name, seed, 0.8 + 0.02 * i)
        fake_run(tmp_path, "lora", "glue", seed, 0.6, task="cola")
        fake_run(tmp_path, "lora", "glue", seed, 0.9, task="sst2")
        fake_run(tmp_path, "vpt", "mnist5k", seed, 0.5)
    tables = {t["title"]: t for t in paper_tables(aggregate(collect(tmp_path)))}
    assert list(tables) == ["CIFAR-100", "FGVC", "GLUE", "Other data sets"]
    assert tables["FGVC"]["header"][-1] == "Mean" and tables["FGVC"]["rows"][0]["cells"][-1][0] == pytest.approx(84.0)
    glue = tables["GLUE"]  # only the tasks that were run, and their average
    assert glue["header"] == ["Method", "Params (M)", "SST-2", "CoLA", "Avg."]
    assert [c[0] for c in glue["rows"][0]["cells"]] == pytest.approx([90.0, 60.0, 75.0])
    assert tables["Other data sets"]["header"][2:] == ["mnist5k"]
    rows = list(csv.DictReader(io.StringIO(format_csv(list(tables.values())))))
    cifar = next(r for r in rows if r["table"] == "CIFAR-100")
    assert (cifar["method"], cifar["column"], float(cifar["mean"]), cifar["n"]) == ("lora", "CIFAR-100", 90.5, "2")
    assert float(cifar["std"]) == pytest.approx(100 * statistics.stdev([0.90, 0.91]), abs=1e-4)
    assert float(cifar["params_m"]) == pytest.approx(0.3)

    md, out_csv, plots = tmp_path / "t.md", tmp_path / "t.csv", tmp_path / "plots"
    code = cli.main(["report", str(tmp_path), "--markdown", str(md), "--csv", str(out_csv), "--plots", str(plots)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "### FGVC" in out.out and md.read_text() in out.out and out_csv.read_text().startswith("table,method")
    assert sorted(p.name for p in plots.iterdir()) == ["cifar100.png", "fgvc.png", "glue.png", "other_data_sets.png"]
    assert (plots / "fgvc.png").read_bytes()[:4] == b"\x89PNG"
    code = cli.main(["report", str(tmp_path)])  # the per-run table is unchanged
    assert code == 0 and "cifar100" not in capsys.readouterr().err
