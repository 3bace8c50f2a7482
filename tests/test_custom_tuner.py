"""A new method is a ~15-line ``Tuner`` subclass: registered, attached by name, trained, saved."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import utuning
from tests.helpers import assert_identity, assert_only_tuner_grads, assert_state_round_trip, one_thread, tiny_vit  # noqa: F401 (one_thread: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class LowRankParallel(utuning.Tuner):
    """``U(x) = (x A) B`` beside the operation, B at zero (a test-only method in the U-Tuning form,
    arXiv 2303.00690)."""

    placement = "parallel"
    site_kinds = frozenset({"attn", "mlp", "block"})
    paper = "https://arxiv.org/abs/2303.00690"

    def __init__(self, site, *, rank: int = 2) -> None:
        super().__init__(site)
        self.a = nn.Parameter(torch.randn(site.dim, rank) * site.dim**-0.5)  # (D, r)
        self.b = nn.Parameter(torch.zeros(rank, site.out_dim))  # (r, D_out)

    def forward(self, x: Tensor, op) -> Tensor:  # (B, N, D) -> (B, N, D_out)
        return x @ self.a @ self.b

@pytest.fixture(scope="module", autouse=True)
def _register_lowrankparallel():
    """Registered for this module's tests only, so registry-wide checks elsewhere never see it."""
    with utuning.TUNERS.registered("test_low_rank_parallel", LowRankParallel):
        yield



INPUTS = {"pixel_values": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))}
SPECS = [("test_low_rank_parallel", ["blocks.*.attn", "blocks.*.mlp"], {"rank": 4}), ("linear_probe", "head")]


def test_registered_and_described():
    assert utuning.TUNERS.get("test_low_rank_parallel") is LowRankParallel
    assert LowRankParallel.name == "test_low_rank_parallel"
    assert LowRankParallel.hyperparameters() == {"rank": 2}


def test_attached_like_any_tuner():
    ref = tiny_vit(num_classes=3).eval()
    assert_identity(lambda: utuning.wrap(tiny_vit(num_classes=3)), lambda i: ref(i["pixel_values"]), SPECS, INPUTS)
    tuned = utuning.tune(utuning.wrap(tiny_vit(num_classes=3)), SPECS)
    assert sorted(tuned.tuner_state_dict())[0] == "blocks.0.attn.test_low_rank_parallel.a"
    assert_only_tuner_grads(tuned, INPUTS)
    assert_state_round_trip(lambda: utuning.tune(utuning.wrap(tiny_vit(num_classes=3)), SPECS), INPUTS)


def test_trains():
    tuned = utuning.tune(utuning.wrap(tiny_vit(num_classes=3)), SPECS[:1]).train()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(tuned(**INPUTS), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # only the new tuner trains (the frozen head stays)
