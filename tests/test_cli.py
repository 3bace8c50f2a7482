"""The ``utuning`` command, called in-process (one subprocess smoke test of the console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from utuning import cli
from utuning.report import collect, format_table

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
CIFAR = RECIPES / "vision" / "cifar100"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _commands() -> list[str]:
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_help_of_every_command(capsys, command: str) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: utuning {command}" in capsys.readouterr().out


def test_check_tiny_builds_and_reports(capsys) -> None:
    code, out, err = run(capsys, "check", "--tiny", str(CIFAR / "dual_u_tuner.yaml"), str(CIFAR / "linear.yaml"),
                         "train.epochs=1")
    assert code == 0, err
    assert out.count("ok ") == 2 and "3,300 / 38,824" in out  # linear probe of the tiny ViT: 32*100+100


def test_check_fails_with_exit_2_and_no_traceback(capsys) -> None:
    code, _, err = run(capsys, "check", "--tiny", str(CIFAR / "lora.yaml"), "train.batch_sise=3")
    assert code == 2
    assert "train.batch_sise" in err and "train.batch_size" in err and "Traceback" not in err
    code, _, err = run(capsys, "check", "--tiny", str(CIFAR / "lora.yaml"), "tuners.0.at=blocks.*.nope")
    assert code == 1 and "blocks.*.nope" in err  # a SiteError: found when the model is built
    code, _, err = run(capsys, "inspect", "no/such/recipe.yaml")
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("method, tunable, millions", [
    ("linear", 76_900, "0.08M"), ("vpt_shallow", 84_580, "0.08M"), ("vpt_deep", 169_060, "0.17M"),
    ("prefix", 261_220, "0.26M"), ("adapter", 270_556, "0.27M"), ("dual_u_tuner", 482_644, "0.48M"),
])
def test_inspect_reproduces_the_papers_parameter_counts(capsys, method: str, tunable: int, millions: str) -> None:
    """ViT-B/16 with a 100-class head, built on the meta device (no weights, no download)."""
    code, out, err = run(capsys, "inspect", str(CIFAR / f"{method}.yaml"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["tunable"] == tunable == sum(row["parameters"] for row in data["sites"])
    assert data["percent"] == pytest.approx(100 * tunable / data["total"])
    code, out, _ = run(capsys, "inspect", str(CIFAR / f"{method}.yaml"))
    assert f"tunable {tunable:,} of" in out and millions in out


def test_list_commands(capsys) -> None:
    code, out, _ = run(capsys, "list", "tuners")
    assert code == 0 and "p_adapter" in out and "hidden=10" in out and "arxiv.org/abs/2303.00690" in out
    code, out, _ = run(capsys, "list", "tuners", "--json")
    lora = next(r for r in json.loads(out) if r["name"] == "lora")
    assert lora["placement"] == "reparam" and lora["site_kinds"] == ["linear"] and lora["hyperparameters"]["rank"] == 8
    assert run(capsys, "list", "compositions")[1].count("dual_u_tuner") == 1
    assert "vit" in run(capsys, "list", "backbones")[1]
    code, out, _ = run(capsys, "list", "sites", str(CIFAR / "lora.yaml"), "--tiny", "--json")
    sites = {r["site"]: r for r in json.loads(out)}
    assert len([s for s in sites if s.startswith("blocks.")]) == 2 * 7 and sites["blocks.1.attn"]["dim"] == 32
    code, out, _ = run(capsys, "list", "sites", "vit")
    assert code == 0 and "blocks.11.mlp.fc2" in out
    code, _, err = run(capsys, "list", "sites", "vitt")
    assert code == 2 and "'vit'" in err


def fake_run(root: Path, name: str, tuners: list[str], tunable: int, acc: float) -> None:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"name": name, "tuners": [{"name": t, "at": "head" if t == "linear_probe" else "blocks.*"} for t in tuners]}))
    summary = {"name": name, "tuners": [], "tunable_params": tunable, "total_params": 86_000_000,
               "tunable_share": tunable / 86e6, "best_eval": {"step": 10, "epoch": 1, "metrics": {"accuracy": acc, "loss": 1.0}},
               "final_eval": {"accuracy": acc - 0.01, "loss": 1.1}, "train_time_s": 12.5, "peak_memory_mb": 100.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_report_table_and_plot(capsys, tmp_path: Path) -> None:
    fake_run(tmp_path, "lin", ["linear_probe"], 76_900, 0.60)
    fake_run(tmp_path, "dual", ["dual_u_tuner", "linear_probe"], 482_644, 0.91)
    (tmp_path / "unfinished").mkdir()  # no summary.json: not a finished run
    rows = collect(tmp_path)
    assert [(r["name"], r["method"], r["best"], r["final"]) for r in rows] == [
        ("lin", "linear_probe", 0.60, pytest.approx(0.59)), ("dual", "dual_u_tuner", 0.91, pytest.approx(0.90))]
    table = format_table(rows)
    assert "482,644" in table and "0.9100" in table and "accuracy" in table
    out_png = tmp_path / "report.png"
    code, out, err = run(capsys, "report", str(tmp_path), "--out", str(out_png))
    assert code == 0, err
    assert "76,900" in out and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(capsys, "report", str(tmp_path / "nothing"))
    assert code == 2 and "does not exist" in err


def test_console_script_smoke() -> None:
    """The installed ``utuning`` script: a bad value exits 2 with the message and no traceback."""
    exe = shutil.which("utuning") or str(Path(sys.executable).parent / "utuning")
    done = subprocess.run([exe, "check", str(CIFAR / "vpt_deep.yaml"), "train.precision=fp8"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "train.precision: unknown precision 'fp8'" in done.stderr and "Traceback" not in done.stderr


def test_train_validates_every_recipe_before_training(tmp_path, capsys):
    """Several recipes: a bad one anywhere fails before the first one trains (nothing written)."""
    from utuning import cli

    good = Path(__file__).resolve().parents[1] / "recipes" / "quickstart" / "lora.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [" + str(good) + "]\ntrain:\n  epoch: 2\n")
    code = cli.main(["train", str(good), str(bad), f"output.dir={tmp_path}/run", "--tiny"])
    assert code == 2
    assert "train.epochs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
