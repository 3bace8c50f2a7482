"""Shared assertion helpers and tiny offline models for the behaviour tests."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn

import utuning
from utuning.backbones.vit import ViTBackbone


def tiny_vit(num_classes: int = 10, *, depth: int = 2, dim: int = 32, heads: int = 2, reg_tokens: int = 0,
             seed: int = 0, **kwargs) -> nn.Module:
    """A 2-block ViT with dim 32 on 32x32 images, built offline."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=depth, embed_dim=dim, num_heads=heads, img_size=32,
        patch_size=8, num_classes=num_classes, reg_tokens=reg_tokens, **kwargs,
    )


def vit_backbone(**kwargs) -> ViTBackbone:
    return ViTBackbone(tiny_vit(**kwargs))


def randomize_tuners(model: utuning.TunedModel, seed: int = 1, std: float = 0.1) -> None:
    """Move every tuner parameter off its (identity) init, so tests see a non-trivial tuner."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def call(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else next(iter(out.values()))


def assert_identity(make_backbone: Callable[[], utuning.Backbone], reference: Callable[[dict], torch.Tensor],
                    specs, inputs: dict, atol: float = 1e-6) -> None:
    """Attaching ``specs`` at their initialisation leaves the outputs of the untouched model."""
    tuned = utuning.tune(make_backbone(), specs).eval()
    with torch.no_grad():
        torch.testing.assert_close(call(tuned, inputs), reference(inputs), atol=atol, rtol=0)


def assert_only_tuner_grads(tuned: utuning.TunedModel, inputs: dict) -> None:
    """After a backward pass, exactly the tuner parameters have gradients; all of them do."""
    tuned.train()
    for p in tuned.parameters():
        p.grad = None
    call(tuned, inputs).float().pow(2).mean().backward()
    trainable = {id(p) for p in tuned.trainable_parameters()}
    names = {id(p): n for n, p in tuned.named_parameters()}
    leaked = [names[id(p)] for p in tuned.parameters() if p.grad is not None and id(p) not in trainable]
    assert not leaked, f"frozen parameters got gradients: {leaked[:5]}"
    missing = [n for n, p in tuned.named_trainable_parameters() if p.grad is None]
    assert not missing, f"tuner parameters without gradient: {missing[:5]}"
    frozen_trainable = [n for n, p in tuned.named_parameters() if p.requires_grad and id(p) not in trainable]
    assert not frozen_trainable, f"parameters trainable outside tuners: {frozen_trainable[:5]}"


def assert_state_round_trip(make_tuned: Callable[[], utuning.TunedModel], inputs: dict) -> None:
    """A tuner state dict loads into a freshly built model and reproduces its outputs."""
    a = make_tuned().eval()
    randomize_tuners(a)
    state = a.tuner_state_dict()
    b = make_tuned().eval()
    b.load_tuner_state_dict(copy.deepcopy(state))
    assert set(b.tuner_state_dict()) == set(state)
    with torch.no_grad():
        torch.testing.assert_close(call(b, inputs), call(a, inputs))


@pytest.fixture()
def one_thread():
    """Run a test on one intra-op thread: tiny models gain nothing from more, and on a loaded
    machine two spinning threads per process made them up to 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
