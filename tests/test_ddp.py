"""Two-process CPU DDP (gloo, started by torchrun) gives the same run as one process: the
global batch is split over the processes, so updates, final tuner weights and metrics agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_engine import tiny_data, tiny_recipe
from utuning.checkpoint import read_checkpoint
from utuning.engine import train
from utuning.schema import TunerConfig

REPO = Path(__file__).resolve().parents[1]
TUNERS = [TunerConfig(name="prompt", at="blocks.*", args={"tokens": 2}),
          TunerConfig(name="p_adapter", at="blocks.*.mlp", args={"hidden": 4}),
          TunerConfig(name="linear_probe", at="head")]

SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_ddp import TUNERS
from tests.test_engine import tiny_data, tiny_recipe
from utuning.engine import train

train(tiny_recipe({out!r}, tuners=TUNERS, epochs=1, grad_accum=2, batch_size=4), data=tiny_data())
"""


def test_two_process_ddp_matches_one_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(repo=str(REPO), out=str(ddp)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["num_processes"] == 2

    reference = train(tiny_recipe(single, tuners=TUNERS, epochs=1, grad_accum=2, batch_size=4), data=tiny_data())
    assert summary["steps"] == reference["steps"] == 4
    assert summary["final_eval"] == pytest.approx(reference["final_eval"], abs=1e-5)
    a, b = read_checkpoint(ddp)[0], read_checkpoint(single)[0]
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert not torch.equal(b["blocks.0.prompt.prompts"], torch.zeros_like(b["blocks.0.prompt.prompts"]))
