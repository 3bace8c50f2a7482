"""Behaviour of the training engine (utuning.engine) on a tiny ViT and a tiny synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from utuning.engine import build_model, evaluate, train
from utuning.engine.optim import param_groups
from utuning.errors import ConfigError
from utuning.schema import BackboneConfig, DataConfig, OptimConfig, OutputConfig, Recipe, TrainConfig, TunerConfig
from utuning.tasks import compute_loss

TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


class TinyImages(Dataset):
    """``n`` 3x32x32 images of ``num_classes`` classes: class-dependent means plus noise."""

    task = "classification"
    metrics = ["accuracy"]

    def __init__(self, n: int = 32, *, num_classes: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.labels = torch.arange(n) % num_classes
        centers = torch.randn(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(123))
        self.images = centers[self.labels] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": {"pixel_values": self.images[i]}, "labels": self.labels[i]}


def tiny_data(n_train: int = 32, n_eval: int = 16) -> tuple[TinyImages, TinyImages]:
    return TinyImages(n_train, seed=0), TinyImages(n_eval, seed=1)


def tiny_recipe(out: str | Path, *, tuners=None, **train) -> Recipe:
    tuners = tuners if tuners is not None else [
        TunerConfig(name="p_adapter", at="blocks.*.mlp", args={"hidden": 4}),
        TunerConfig(name="linear_probe", at="head"),
    ]
    settings = {"epochs": 2, "batch_size": 8, "log_every": 1, **train}
    return Recipe(
        name="tiny",
        backbone=BackboneConfig(name="vit", model="vit_tiny_patch16_224", img_size=32, args=dict(TINY_VIT)),
        tuners=tuners,
        data=DataConfig(name="tiny"),
        optim=OptimConfig(name="adamw", lr=1e-2, weight_decay=0.05),
        train=TrainConfig(**settings),
        output=OutputConfig(dir=str(out), tensorboard=False),
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_writes_run_folder_and_learns(tmp_path):
    summary = train(tiny_recipe(tmp_path, epochs=3, batch_size=16), data=tiny_data())
    assert {p.name for p in tmp_path.iterdir()} >= {"recipe.yaml", "metrics.jsonl", "summary.json", "checkpoints"}
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(train_losses) == 6 and len(evals) == 3 and summary["steps"] == 6
    assert sum(train_losses[-2:]) < sum(train_losses[:2])
    assert summary["final_eval"]["accuracy"] > 0.5
    assert summary["final_eval"] == {k: v for k, v in evals[-1].items() if k not in ("split", "step", "epoch")}
    model = build_model(tiny_recipe(tmp_path), num_classes=4)
    assert (summary["tunable_params"], summary["total_params"]) == model.num_parameters()
    assert summary["peak_memory_mb"] > 0 and summary["train_time_s"] > 0
    assert (tmp_path / "checkpoints" / "last").read_text().strip() == "step_00000006"


def test_training_changes_only_tuner_weights(tmp_path):
    recipe = tiny_recipe(tmp_path, epochs=1)
    before = build_model(recipe, num_classes=4)
    train(recipe, data=tiny_data())
    from utuning.checkpoint import load_tuned

    after = load_tuned(tmp_path)
    for (name, a), b in zip(before.backbone.frozen_state_dict().items(), after.backbone.frozen_state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    changed = [k for k, v in after.tuner_state_dict().items() if not torch.equal(v, before.tuner_state_dict()[k])]
    assert len(changed) == len(before.tuner_state_dict())


def test_optimizer_gets_exactly_the_tuner_parameters_with_decay_rules(tmp_path):
    tuners = [TunerConfig(name="prompt", at="blocks.*", args={"tokens": 2}),
              TunerConfig(name="p_adapter", at="blocks.0.mlp", args={"hidden": 4}),
              TunerConfig(name="linear_probe", at="head")]
    model = build_model(tiny_recipe(tmp_path, tuners=tuners), num_classes=4)
    groups = param_groups(model, 0.05)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    names = {id(p): n for n, p in model.named_trainable_parameters()}
    assert decay | no_decay == set(names) and not decay & no_decay
    assert sorted(names[i] for i in decay) == ["blocks.0.mlp.p_adapter.bottleneck.down.weight",
                                               "blocks.0.mlp.p_adapter.bottleneck.up.weight", "head.linear_probe.fc.weight"]
    assert "blocks.1.prompt.prompts" in {names[i] for i in no_decay}


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    sgd = OptimConfig(name="momentum", lr=0.1, weight_decay=0.0, momentum=0.0)
    a = tiny_recipe(tmp_path / "a", epochs=1, batch_size=8)
    b = tiny_recipe(tmp_path / "b", epochs=1, batch_size=4, grad_accum=2)
    a.optim = b.optim = sgd
    a.schedule.name = b.schedule.name = "none"
    sa, sb = train(a, data=tiny_data()), train(b, data=tiny_data())
    assert sa["steps"] == sb["steps"] == 4
    from utuning.checkpoint import read_checkpoint

    wa, wb = read_checkpoint(tmp_path / "a")[0], read_checkpoint(tmp_path / "b")[0]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tuner", [TunerConfig(name="prompt", at="blocks.*", args={"tokens": 3}),
                                   TunerConfig(name="prefix", at="blocks.*.attn", args={"tokens": 3})])
def test_grad_checkpointing_gives_the_same_tuner_gradients(tmp_path, tuner):
    recipe = tiny_recipe(tmp_path, tuners=[tuner, TunerConfig(name="linear_probe", at="head")])
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model = build_model(recipe, num_classes=4).train()
        if checkpointing:
            model.set_grad_checkpointing(True)
        model(pixel_values=x).pow(2).mean().backward()
        assert all(p.grad is None for p in model.backbone.model.parameters() if not p.requires_grad)
        grads.append({n: p.grad.clone() for n, p in model.named_trainable_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert grads[0][k].abs().sum() > 0, k
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)


def test_ema_weights_are_saved_and_evaluated(tmp_path):
    recipe = tiny_recipe(tmp_path, epochs=2, ema=0.5)
    summary = train(recipe, data=tiny_data())
    from utuning.checkpoint import load_train_state, read_checkpoint

    saved, _ = read_checkpoint(tmp_path)
    state = load_train_state(tmp_path)
    key = "head.linear_probe.fc.weight"
    torch.testing.assert_close(saved[key], state["ema"]["shadow"][key])
    assert not torch.allclose(saved[key], state["tuner"][key])
    again = evaluate(recipe, tmp_path, data=tiny_data()[1])
    assert again == pytest.approx(summary["final_eval"], abs=1e-6)


def test_evaluate_reproduces_the_final_eval(tmp_path):
    recipe = tiny_recipe(tmp_path, epochs=1)
    summary = train(recipe, data=tiny_data())
    assert evaluate(None, tmp_path / "checkpoints" / "last", data=tiny_data()[1]) == pytest.approx(summary["final_eval"])


def test_steps_and_cosine_warmup_schedule(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=6)
    recipe.schedule.warmup_epochs = 0.5  # 2 of the 4 updates per epoch
    recipe.schedule.warmup_lr = 1e-4
    summary = train(recipe, data=tiny_data())
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert summary["steps"] == 6 and summary["epochs"] == 1.5 and len(lrs) == 6  # 6 of 4 updates per epoch
    assert lrs[0] == pytest.approx(1e-4) and lrs[1] < lrs[2]
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))


def test_losses_by_task():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(compute_loss("classification", logits, labels, label_smoothing=0.1),
                               torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    values = torch.randn(4, 1)
    torch.testing.assert_close(compute_loss("regression", values, values.squeeze(-1) + 1), torch.tensor(1.0))
    tokens = torch.randn(2, 5, 3)
    tags = torch.tensor([[0, 1, -100, 2, -100], [1, -100, -100, -100, 0]])
    keep = tags != -100
    torch.testing.assert_close(compute_loss("labelling", tokens, tags),
                               torch.nn.functional.cross_entropy(tokens[keep], tags[keep]))
    spans = torch.randn(2, 6, 2)
    pos = torch.tensor([[1, 3], [0, 5]])
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(compute_loss("qa", spans, pos), (ce(spans[..., 0], pos[:, 0]) + ce(spans[..., 1], pos[:, 1])) / 2)
    both = compute_loss("classification", {"a": logits, "b": logits * 2}, {"a": labels, "b": labels})
    torch.testing.assert_close(both, ce(logits, labels) + ce(logits * 2, labels))


def test_bad_settings_fail_before_training(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe.task.type = "classifcation"
    with pytest.raises(ConfigError, match="Did you mean \\['classification'"):
        train(recipe, data=tiny_data())
    recipe = tiny_recipe(tmp_path, precision="fp8")
    with pytest.raises(ConfigError, match="train.precision"):
        train(recipe, data=tiny_data())
    recipe = tiny_recipe(tmp_path)
    recipe.optim.name = "adamx"
    with pytest.raises(ConfigError, match="optim.name 'adamx'"):
        train(recipe, data=tiny_data())
    assert not (tmp_path / "checkpoints").exists()
