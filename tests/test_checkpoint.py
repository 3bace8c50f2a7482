"""Checkpoints: atomic folders and pointers, loading into the same or a different model, and
resuming a run that was killed (SIGKILL) to the same result as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_engine import tiny_data, tiny_recipe
from utuning.checkpoint import load_into, load_tuned, read_checkpoint, read_pointer, save_checkpoint
from utuning.engine import build_model, train
from utuning.errors import ConfigError, StateDictError
from utuning.schema import TunerConfig

REPO = Path(__file__).resolve().parents[1]
DROPOUT_TUNERS = [TunerConfig(name="p_adapter", at="blocks.*.mlp", args={"hidden": 4, "dropout": 0.2}),
                  TunerConfig(name="linear_probe", at="head")]

# Trains 3 epochs of 4 updates, a checkpoint every 2 updates (mid-epoch ones included), slowly
# enough (a sleep per item) that the test can kill it after the first checkpoint.
SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.test_checkpoint import DROPOUT_TUNERS
from tests.test_engine import TinyImages, tiny_data, tiny_recipe
from utuning.engine import train

class Slow(TinyImages):
    def __getitem__(self, i):
        time.sleep(0.05)
        return super().__getitem__(i)

train_ds, eval_ds = tiny_data()
slow = Slow(len(train_ds), seed=0)
train(tiny_recipe({out!r}, tuners=DROPOUT_TUNERS, epochs=3, checkpoint_every=2), data=(slow, eval_ds))
"""


def test_save_is_atomic_and_pointers_track_the_newest(tmp_path):
    recipe = tiny_recipe(tmp_path)
    model = build_model(recipe, num_classes=4)
    state = model.tuner_state_dict()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step=step, tuner_state=state, recipe=recipe, num_classes=4, best=step == 2,
                        tuners=model.tuner_config())
    assert read_pointer(tmp_path).name == "step_00000006"
    assert read_pointer(tmp_path, "best").name == "step_00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last", "step_00000002", "step_00000004", "step_00000006"]
    with safe_open(str(tmp_path / "step_00000006" / "tuner.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["recipe"])["name"] == "tiny" and json.loads(meta["num_classes"]) == 4
    assert "p_adapter" in (tmp_path / "step_00000006" / "recipe.yaml").read_text()
    # A crash while writing leaves only a hidden temporary folder, never a new "last"; the next save removes it.
    (tmp_path / ".step_00000008.tmp-1").mkdir()
    assert read_pointer(tmp_path).name == "step_00000006"
    save_checkpoint(tmp_path, step=8, tuner_state=state, recipe=recipe, num_classes=4, tuners=model.tuner_config())
    assert not list(tmp_path.glob(".step_*")) and read_pointer(tmp_path).name == "step_00000008"


def test_load_tuned_rebuilds_the_trained_model(tmp_path):
    recipe = tiny_recipe(tmp_path, epochs=1)
    train(recipe, data=tiny_data())
    state, meta = read_checkpoint(tmp_path)
    model = load_tuned(tmp_path)
    assert meta["recipe"] == recipe and not model.training
    fresh = build_model(recipe, num_classes=4).eval()
    x = tiny_data()[1].images[:4]
    with torch.no_grad():
        assert not torch.allclose(model(pixel_values=x), fresh(pixel_values=x))
        fresh.load_tuner_state_dict(state)
        torch.testing.assert_close(model(pixel_values=x), fresh(pixel_values=x))


def test_mismatched_recipe_or_model_fails_naming_the_difference(tmp_path):
    recipe = tiny_recipe(tmp_path, epochs=1)
    model = build_model(recipe, num_classes=4)
    save_checkpoint(tmp_path, step=1, tuner_state=model.tuner_state_dict(), recipe=recipe, num_classes=4,
                    tuners=model.tuner_config())
    other = tiny_recipe(tmp_path, tuners=[TunerConfig(name="p_adapter", at="blocks.*.mlp", args={"hidden": 8}),
                                          TunerConfig(name="linear_probe", at="head")])
    model = build_model(other, num_classes=4)
    with pytest.raises(ConfigError, match="tuner config differs: #0: .*'hidden': 4.* vs recipe .*'hidden': 8"):
        load_into(model, tmp_path, other)
    with pytest.raises(StateDictError, match="mis-shaped .*bottleneck.down.weight: checkpoint \\(4, 32\\) vs model \\(8, 32\\)"):
        load_into(model, tmp_path)
    moved = tiny_recipe(tmp_path)
    moved.backbone.model = "vit_small_patch16_224"
    with pytest.raises(ConfigError, match="backbone.model='vit_tiny_patch16_224', not 'vit_small_patch16_224'"):
        load_into(build_model(recipe, num_classes=4), tmp_path, moved)
    with pytest.raises(ConfigError, match="No checkpoint at"):
        load_tuned(tmp_path / "nowhere")


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(repo=str(REPO), out=str(killed)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while read_pointer(killed / "checkpoints") is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (killed / "summary.json").exists()
    interrupted_at = read_checkpoint(killed)[1]["step"]
    assert 0 < interrupted_at < 12

    resumed = train(tiny_recipe(killed, tuners=DROPOUT_TUNERS, epochs=3, checkpoint_every=2), resume=True, data=tiny_data())
    reference = train(tiny_recipe(clean, tuners=DROPOUT_TUNERS, epochs=3, checkpoint_every=2), data=tiny_data())
    assert resumed["steps"] == reference["steps"] == 12
    assert resumed["final_eval"] == pytest.approx(reference["final_eval"], abs=1e-6)
    a, b = read_checkpoint(killed)[0], read_checkpoint(clean)[0]
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 13))


def test_export_full_finetune_backbone_loads_into_timm(tmp_path):
    """`utuning export` after full fine-tuning writes the timm state dict (original keys); a new
    timm model created from that file gives the fine-tuned model's outputs. Side-by-side tuners
    (adapters) are refused."""
    import timm

    from tests.test_engine import TINY_VIT
    from utuning import cli
    from utuning.checkpoint import export_backbone

    recipe = tiny_recipe(tmp_path / "full", tuners=[TunerConfig(name="full_finetune", at="**")], epochs=1)
    train(recipe, data=tiny_data())
    out = tmp_path / "backbone.safetensors"
    assert cli.main(["export", str(tmp_path / "full"), "--out", str(out)]) == 0
    tuned = load_tuned(tmp_path / "full")
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=tuned.backbone.model.num_classes,
                              img_size=32, pretrained_cfg_overlay={"file": str(out)}, **TINY_VIT).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # timm re-initialises a head whose class count differs from its config: compare pre-logits
        ours = tuned.backbone.intermediates(pixel_values=x, layers=[]).pooled
        torch.testing.assert_close(fresh.forward_head(fresh.forward_features(x), pre_logits=True), ours)
    exported = load_file(str(out))
    assert set(exported) == set(timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, **TINY_VIT).state_dict())
    assert not torch.equal(exported["blocks.0.attn.qkv.weight"], build_model(recipe, num_classes=4)
                           .backbone.model.state_dict()["blocks.0.attn.qkv.weight"])  # fine-tuned, not the start
    train(tiny_recipe(tmp_path / "adapter"), data=tiny_data())
    with pytest.raises(ConfigError, match="cannot be folded"):
        export_backbone(tmp_path / "adapter", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_run_ended_by_steps_inside_an_epoch_resumes_with_that_epochs_remaining_batches(tmp_path):
    """``train.steps`` can stop a run inside an epoch; resumed with more steps it goes on with the
    rest of that epoch (not the next one), so it ends where a run given the larger count does."""
    def recipe(out, steps):
        r = tiny_recipe(out, tuners=DROPOUT_TUNERS, steps=steps)
        r.schedule.name = "none"  # a schedule depends on the total count, which resuming changes
        return r

    short = train(recipe(tmp_path / "a", 3), data=tiny_data())  # 4 batches per epoch: stops at batch 3 of epoch 0
    assert short["steps"] == 3 and short["epochs"] == 0.75
    resumed = train(recipe(tmp_path / "a", 6), resume=True, data=tiny_data())
    reference = train(recipe(tmp_path / "b", 6), data=tiny_data())
    assert resumed["steps"] == reference["steps"] == 6 and resumed["epochs"] == reference["epochs"] == 1.5
    a, b = read_checkpoint(tmp_path / "a")[0], read_checkpoint(tmp_path / "b")[0]
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
