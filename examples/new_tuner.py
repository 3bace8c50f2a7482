"""Prototype a new PETL method in a few lines: an (IA)³-style rescaling tuner.

(IA)³ (Liu et al. 2022, arXiv 2205.05638) learns one vector per adapted linear layer that
rescales its outputs: ``y = l ⊙ (W x + b)``, with ``l`` starting at ones. In utuning that is
a ``reparam`` tuner on linear sites: it receives the frozen layer's input ``x`` and output
``y`` and returns the new output, and it can be merged into the frozen weights
(``W' = l ⊙ W``, ``b' = l ⊙ b``). Nothing else is needed: the registry makes it usable from
Python and from recipes (``tuners: [{name: example_ia3, at: "blocks.*.mlp.fc1"}]``).

Run it (a tiny ViT, frozen and random, trained on synthetic images or on MNIST-5k)::

    python examples/new_tuner.py --steps 40
    python examples/new_tuner.py --data mnist5k --root ../shared/data/mnist5k.npz
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import utuning
from utuning.handle import OpHandle
from utuning.sites import SiteSpec


# The new method: 20 lines ---------------------------------------------------------------------
@utuning.register_tuner("example_ia3")
class RescaleOutputs(utuning.Tuner):
    """(IA)³-style rescaling of a frozen linear layer's outputs: ``y = l ⊙ (W x + b)``.

    Liu et al. 2022, https://arxiv.org/abs/2205.05638. ``l`` starts at ``init`` (1: identity).
    """

    placement = "reparam"  # sees (x, y) of a frozen linear layer; mergeable into it
    site_kinds = frozenset({"linear"})
    paper = "https://arxiv.org/abs/2205.05638"

    def __init__(self, site: SiteSpec, *, init: float = 1.0) -> None:
        super().__init__(site)
        self.scale = nn.Parameter(torch.full((site.out_dim,), float(init)))  # (D_out,)

    def forward(self, x: Tensor, y: Tensor, op: OpHandle) -> Tensor:  # y: (..., D_out)
        return y * self.scale

    @torch.no_grad()
    def merge(self, op: OpHandle) -> None:
        op.linear.weight.mul_(self.scale[:, None])
        if op.linear.bias is not None:
            op.linear.bias.mul_(self.scale)

    @torch.no_grad()
    def unmerge(self, op: OpHandle) -> None:
        op.linear.weight.div_(self.scale[:, None])
        if op.linear.bias is not None:
            op.linear.bias.div_(self.scale)


# Using it ---------------------------------------------------------------------------------------
def synthetic_batches(batch_size: int, *, classes: int = 10, seed: int = 0):
    """Images of 10 fixed random patterns plus noise: an endless stream of learnable batches."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(classes, 3, 32, 32, generator=g)
    while True:
        labels = torch.randint(0, classes, (batch_size,), generator=g)
        pixels = prototypes[labels] + 0.5 * torch.randn(batch_size, 3, 32, 32, generator=g)
        yield {"inputs": {"pixel_values": pixels}, "labels": labels}


def mnist5k_batches(batch_size: int, *, root: str, backbone: utuning.Backbone, subset: int = 512):
    from torch.utils.data import DataLoader

    from utuning.data import build_dataset

    ds = build_dataset("mnist5k", split="train", root=root, backbone=backbone, augment=False, subset=subset,
                       subset_mode="stratified")
    while True:
        yield from DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=ds.collate)


def main(*, steps: int = 40, batch_size: int = 32, lr: float = 5e-2, data: str = "synthetic", root: str | None = None,
         seed: int = 0, log: Callable[[str], None] = print) -> list[float]:
    """Attach the new tuner (plus a trainable head) to a tiny frozen ViT, train, return the losses."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                            img_size=32, patch_size=8, num_classes=10)
    model = utuning.tune(vit, [
        {"name": "example_ia3", "at": ["blocks.*.attn.qkv", "blocks.*.mlp.fc1"]},
        {"name": "linear_probe", "at": "head"},
    ])
    log(model.format_summary())
    if data == "mnist5k":
        batches = mnist5k_batches(batch_size, root=root, backbone=model.backbone)
    else:
        batches = synthetic_batches(batch_size, seed=seed)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        batch = next(batches)
        loss = F.cross_entropy(model(**batch["inputs"]), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.4f}")

    # The tuner folds into the frozen weights: the merged model computes the same outputs.
    model.eval()
    probe = next(batches)["inputs"]
    with torch.no_grad():
        before = model(**probe)
        model.merge()
        merged = model(**probe)
        model.unmerge()
    log(f"max |tuned - merged| = {(before - merged).abs().max().item():.2e}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--data", choices=["synthetic", "mnist5k"], default="synthetic")
    parser.add_argument("--root", default=None, help="mnist5k.npz (for --data mnist5k)")
    a = parser.parse_args()
    main(steps=a.steps, batch_size=a.batch_size, lr=a.lr, data=a.data, root=a.root)
