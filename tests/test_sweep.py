"""``utuning sweep``: a tiny VTAB-1k sweep (2 methods x 2 learning rates on val200, then 2 seeds on
test) is killed midway, resumed, and its table checked against the individual runs' summaries."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_vtab import write_task
from utuning import cli
from utuning.errors import ConfigError
from utuning.sweep import load_sweep, plan

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.epochs=1", "train.batch_size=4", "eval.batch_size=8", "eval.every=1", "train.precision='no'",
        "output.tensorboard=false", "schedule.warmup_epochs=0"]


def write_sweep(tmp_path: Path, **extra) -> Path:
    write_task(tmp_path / "vtab-1k", "eurosat", per_split=4, size=8)
    spec = {
        "name": "tiny", "out": str(tmp_path / "out"), "tiny": True,
        "methods": {"linear": str(REPO / "recipes/vtab/{data}/linear.yaml"),
                    "u_tuning": str(REPO / "recipes/vtab/{data}/u_tuning.yaml")},
        "data": ["eurosat"], "seeds": [0, 1],
        "overrides": [f"data.root={tmp_path / 'vtab-1k'}", *FAST, "optim.name=adamw"],
        "search": {"sampler": "grid", "space": {"optim.lr": [0.003, 0.3]}, "seeds": 1,
                   "overrides": ["data.train_split=train800", "data.eval_split=val200"]},
        "final": {"overrides": ["data.train_split=train800val200", "data.eval_split=test"]},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def summaries(root: Path) -> dict[Path, dict]:
    return {p.parent: json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))}


def test_sweep_file_errors_and_plan(tmp_path: Path) -> None:
    path = write_sweep(tmp_path)
    text = plan(load_sweep(path))
    assert "grid search over ['optim.lr']: 2 trials x 1 seed(s)" in text and "8 runs in all" in text
    bad = yaml.safe_load(path.read_text())
    bad["search"]["sampler"] = "gird"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="'gird' is not one of .* did you mean \\['grid'\\]"):
        load_sweep(path)
    bad["search"] = {"sampler": "grid", "space": {"optim.lr": {"low": 0.1, "high": 1.0}}}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="optim.lr: give a list of values"):
        load_sweep(path)
    bad["search"], bad["seed"] = None, [1]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="unknown key 'seed'. Did you mean \\['seeds'\\]"):
        load_sweep(path)


def first_attempt(path: str) -> None:
    os.setsid()
    sys.exit(cli.main(["sweep", path, "--jobs", "2"]))


def test_a_killed_sweep_resumes_without_redoing_runs(tmp_path: Path, capsys) -> None:
    path = write_sweep(tmp_path, launcher="process")
    out = tmp_path / "out"
    # First attempt: a process in its own session, killed with its training runs (fresh interpreters,
    # launcher "process") as a cluster's scheduler kills a job, once two runs have finished.
    first = multiprocessing.get_context("fork").Process(target=first_attempt, args=(str(path),))
    first.start()
    deadline = time.time() + 300
    while len(summaries(out)) < 2 and time.time() < deadline and first.is_alive():
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.join()
    before = {run: (run / "summary.json").stat().st_mtime_ns for run in summaries(out)}
    assert 2 <= len(before) < 8, "the sweep should be killed midway"

    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "launcher": "fork"}))  # how runs start is not what they are
    code = cli.main(["sweep", str(path), "--jobs", "2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    runs = summaries(out)
    assert len(runs) == 8  # 2 methods x 2 learning rates (search) + 2 methods x 2 seeds (final)
    assert all((run / "summary.json").stat().st_mtime_ns == t for run, t in before.items())  # not redone

    selection = {s["method"]: s for s in json.loads((out / "selection.json").read_text())}
    table = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    for method in ("linear", "u_tuning"):
        search = {run: s for run, s in runs.items() if run.parts[-5:-3] == ("search", method)}
        assert len(search) == 2
        lr = {json.loads((run / "sweep.json").read_text())["params"]["optim.lr"]: s["final_eval"]["accuracy"]
              for run, s in search.items()}
        assert sorted(lr) == [0.003, 0.3]
        best = max(lr, key=lambda k: (lr[k], -k))  # Optuna keeps the first best trial; ties are possible
        assert lr[selection[method]["params"]["optim.lr"]] == lr[best] == pytest.approx(selection[method]["value"])
        final = [runs[out / "final" / method / "eurosat" / f"s{seed}"] for seed in (0, 1)]
        for seed in (0, 1):
            recipe = yaml.safe_load((out / "final" / method / "eurosat" / f"s{seed}" / "recipe.yaml").read_text())
            assert recipe["train"]["seed"] == seed and recipe["data"]["eval_split"] == "test"
            assert recipe["optim"]["lr"] == selection[method]["params"]["optim.lr"]
        accs = [100 * s["final_eval"]["accuracy"] for s in final]
        row = next(r for r in table if r["method"] == method and r["column"] == "EuroSAT")
        assert float(row["mean"]) == pytest.approx(statistics.mean(accs), abs=1e-4)
        assert float(row["std"]) == pytest.approx(statistics.stdev(accs), abs=1e-4) and row["n"] == "2"
        assert float(row["params_m"]) == pytest.approx(final[0]["tunable_params"] / 1e6, abs=1e-4)
    assert "### Other data sets" in printed.out or "### VTAB-1k" in printed.out

    import optuna

    storage = f"sqlite:///{out / 'optuna.db'}"
    study = optuna.load_study(study_name="tiny/linear/eurosat", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted({t.params["optim.lr"] for t in complete}) == [0.003, 0.3]  # a grid point may run twice
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]

    again = cli.main(["sweep", str(path)])  # everything finished: nothing runs, same table
    assert again == 0 and summaries(out) == runs and capsys.readouterr().out.count("EuroSAT") >= 1


def test_a_failing_run_is_named_and_the_others_still_count(tmp_path: Path, capsys) -> None:
    """No search: the recipe's own values, one seed; a run that fails is named with its log, the
    others still make the table, the exit status is 1."""
    linear = str(REPO / "recipes/vtab/{data}/linear.yaml")
    path = write_sweep(tmp_path, seeds=[3], search=None,
                       methods={"linear": linear, "broken": {"recipe": linear, "overrides": ["optim.lr=-1"]}})
    assert cli.main(["sweep", str(path), "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "failed: " in err and str(tmp_path / "out" / "final" / "broken" / "eurosat" / "s3") in err
    assert "optim.lr: must be > 0" in (tmp_path / "out" / "final" / "broken" / "eurosat" / "s3" / "sweep.log").read_text()
    (run,) = summaries(tmp_path / "out")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert run == tmp_path / "out" / "final" / "linear" / "eurosat" / "s3" and recipe["train"]["seed"] == 3
    assert recipe["data"]["train_split"] == "train800val200"
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| linear |" in table and "broken" not in table


class FakeRunner:
    """Stands in for the training processes: a run's accuracy is a function of its learning rate."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[float] = []
        self.delay = delay

    def run(self, method, data, phase, params, seed):
        self.calls.append(params["optim.lr"])
        time.sleep(self.delay)
        return Path("unused"), {"status": "finished", "final_eval": {"accuracy": 1 - abs(params["optim.lr"] - 0.01)}}


def test_a_trial_left_running_is_retried_with_its_values(tmp_path: Path) -> None:
    """A sweep killed inside a trial leaves it RUNNING; the next one runs that grid point again, once."""
    import optuna

    from utuning.sweep import _sampler, _storage, search

    spec = yaml.safe_load(write_sweep(tmp_path).read_text())
    spec["search"]["space"] = {"optim.lr": [0.001, 0.01, 0.1]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    method = sweep.methods[0]
    study = optuna.create_study(study_name="tiny/linear/eurosat", storage=_storage(sweep.storage, False),
                                direction="maximize",
                                sampler=_sampler(sweep.search, sweep.search["space"]), load_if_exists=True)
    killed = study.ask()  # what a killed sweep leaves behind: a trial that never ends
    killed.suggest_categorical("optim.lr", [0.001, 0.01, 0.1])
    runner = FakeRunner()
    chosen = search(sweep, runner, method, "eurosat", jobs=1, worker=False)
    assert sorted(runner.calls) == [0.001, 0.01, 0.1] and chosen["params"] == {"optim.lr": 0.01}
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and optuna.trial.TrialState.RUNNING not in states
    assert search(sweep, runner, method, "eurosat", jobs=1, worker=False) == chosen and len(runner.calls) == 3


def test_workers_share_one_study(tmp_path: Path) -> None:
    """Two ``--worker`` processes (threads here) on one storage: every grid point done, one choice."""
    from concurrent.futures import ThreadPoolExecutor

    from utuning.sweep import search

    sweep = load_sweep(write_sweep(tmp_path))
    runner = FakeRunner(delay=0.2)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: search(sweep, runner, sweep.methods[1], "eurosat", jobs=1, worker=True),
                                range(2)))
    assert set(runner.calls) == {0.003, 0.3} and results[0]["params"] == results[1]["params"] == {"optim.lr": 0.003}


def test_threads_never_take_the_same_waiting_trial(tmp_path: Path) -> None:
    """Retried trials wait in the queue; on SQLite, threads popping them raced (two took one, and
    Optuna failed with 'Cannot tell a COMPLETE trial') until transactions began IMMEDIATE."""
    import optuna

    from utuning.sweep import _storage

    study = optuna.create_study(storage=_storage(f"sqlite:///{tmp_path / 'o.db'}", False), direction="maximize")
    for i in range(30):
        study.enqueue_trial({"x": float(i)})
    seen: list[float] = []

    def objective(trial) -> float:
        seen.append(trial.suggest_float("x", 0, 100))
        time.sleep(0.005)
        return seen[-1]

    study.optimize(objective, n_trials=30, n_jobs=6)
    assert sorted(seen) == [float(i) for i in range(30)]


def test_tpe_search_over_a_range(tmp_path: Path) -> None:
    """A TPE search: ``trials`` completed trials with values drawn from a log range; resuming adds none."""
    from utuning.sweep import search

    spec = yaml.safe_load(write_sweep(tmp_path).read_text())
    spec["search"].update(sampler="tpe", trials=4, space={"optim.lr": {"low": 1.0e-4, "high": 1.0, "log": True}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    runner = FakeRunner()
    chosen = search(sweep, runner, sweep.methods[0], "eurosat", jobs=2, worker=False)
    assert len(runner.calls) == 4 and all(1e-4 <= lr <= 1.0 for lr in runner.calls)
    best = min(runner.calls, key=lambda lr: abs(lr - 0.01))
    assert chosen["params"] == {"optim.lr": best} and chosen["trials"] == 4
    assert search(sweep, runner, sweep.methods[0], "eurosat", jobs=2, worker=False) == chosen
    assert len(runner.calls) == 4
    assert "tpe search over ['optim.lr']: 4 trials x 1 seed(s)" in plan(sweep)
