"""Y-Tuning learns from the first step on any balanced K-way task (issue 11): no symmetric
saddle at initialisation, and at least a linear probe's accuracy where a linear probe is easy.

Features are synthetic and frozen (the Y-network reads them as a backbone's block outputs):
every token carries its class's direction under a large component shared by all samples and
token noise, in the last block strongly and in the first weakly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import utuning
from tests.helpers import vit_backbone
from utuning.backbone import Features

DIM, TOKENS = 32, 8


def blocks_task(k: int, per_class: int, seed: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)  # class directions fixed per task, samples per seed
    means, shared = torch.randn(k, DIM, generator=g), torch.randn(DIM, generator=g) * 3
    g.manual_seed(seed)
    y = torch.arange(k).repeat(per_class)[torch.randperm(k * per_class, generator=g)]
    def block(signal: float) -> torch.Tensor:  # (n, N, D)
        return shared + signal * means[y][:, None] + 1.5 * torch.randn(len(y), TOKENS, DIM, generator=g)
    return {0: block(0.2), 1: block(0.5)}, y


def features(layers: dict[int, torch.Tensor], idx: torch.Tensor) -> Features:
    picked = {i: t[idx] for i, t in layers.items()}
    return Features(picked, picked[1], picked[1].mean(1))


def linear_probe_accuracy(train, test, k: int) -> float:
    """Logistic regression on the standardised pooled last block, trained to convergence."""
    (x, y), (xt, yt) = ((layers[1].mean(1), t) for layers, t in (train, test))
    mean, std = x.mean(0), x.std(0)
    probe = torch.nn.Linear(DIM, k)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe((x - mean) / std), y) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return (probe((xt - mean) / std).argmax(-1) == yt).float().mean().item()


@pytest.mark.parametrize(("k", "samples"), [(2, 640), (6, 960), (20, 1600)])
def test_ytuning_leaves_chance_in_the_first_epoch_and_reaches_a_linear_probe(k, samples):
    train, test = blocks_task(k, samples // k, seed=0), blocks_task(k, 40, seed=1)
    torch.manual_seed(0)
    tuned = utuning.tune(vit_backbone(depth=2, dim=DIM), [("ytuning", "blocks.*", {"num_labels": k, "hidden": 32, "heads": 2})])  # dropout 0.1
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-3, weight_decay=0.01)
    (layers, y), n, batch = train, len(train[1]), 32
    epoch_losses = []
    for _ in range(5):
        tuned.train()
        losses = []
        for idx in torch.randperm(n).split(batch):
            loss = F.cross_entropy(tuned.side_forward(features(layers, idx)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        epoch_losses.append(losses)
    last_of_first = sum(epoch_losses[0][-10:]) / 10
    assert last_of_first < 0.8 * math.log(k), (last_of_first, math.log(k))
    tuned.eval()
    with torch.no_grad():
        pred = tuned.side_forward(features(test[0], torch.arange(len(test[1])))).argmax(-1)
    accuracy = (pred == test[1]).float().mean().item()
    probe = linear_probe_accuracy(train, test, k)
    assert accuracy >= probe - 0.02, (accuracy, probe)


def test_the_first_step_already_separates_the_labels():
    """At initialisation each label's score already depends on the input (no input-independent
    prior only): the per-sample spread of the logits is not zero, and labels differ."""
    (layers, _), k = blocks_task(6, 10, seed=0), 6
    tuned = utuning.tune(vit_backbone(depth=2, dim=DIM), [("ytuning", "blocks.*", {"num_labels": k})]).eval()
    with torch.no_grad():
        logits = tuned.side_forward(features(layers, torch.arange(60)))  # (60, 6)
    centred = logits - logits.mean(1, keepdim=True)  # what a softmax over labels sees
    assert centred.std(0).min() > 0.05  # every label's relative score moves with the input
    assert torch.linalg.matrix_rank(centred) >= k - 1  # labels are not copies of one another
