"""The new-tuner example runs, trains only its tuners, merges exactly, and its loss falls."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import utuning
from tests.helpers import assert_only_tuner_grads, vit_backbone

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "new_tuner.py"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("utuning_example_new_tuner", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers example_ia3
    yield module
    utuning.TUNERS.unregister("example_ia3")


def test_example_loss_falls(example):
    lines: list[str] = []
    losses = example.main(steps=30, batch_size=16, log=lines.append)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert "example_ia3" in lines[0] and "linear_probe" in lines[0]
    assert float(lines[-1].split("=")[1]) < 1e-4  # merged model == tuned model


def test_example_tuner_is_identity_and_trains_only_itself(example):
    specs = [{"name": "example_ia3", "at": "blocks.*.mlp.fc1"}]
    backbone = vit_backbone()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = backbone(x)
    tuned = utuning.tune(backbone, specs).eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), reference)
    assert_only_tuner_grads(tuned, {"pixel_values": x})
    assert tuned.num_parameters()[0] == 2 * 128  # one scale per fc1 output channel, two blocks


@pytest.mark.skipif(not (SHARED / "mnist5k.npz").is_file(), reason="shared offline data not present")
def test_example_runs_on_mnist5k(example):
    # Real data through the data API (a random frozen ViT learns MNIST slowly: only check it trains).
    losses = example.main(steps=3, batch_size=16, data="mnist5k", root=str(SHARED / "mnist5k.npz"), log=lambda _: None)
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
