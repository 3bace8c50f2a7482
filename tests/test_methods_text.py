"""LoReFT and LLaMA-Adapter's gated adaption prompt: their papers' equations, on a tiny ViT and a
tiny BERT."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import utuning
from tests.helpers import call, one_thread, randomize_tuners, tiny_vit  # noqa: F401 (one_thread: fixture)
from tests.text_helpers import padded_inputs, text_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loreft_worked_example():
    """ReFT (arXiv 2404.03592, Eq. 2): Φ(h) = h + Rᵀ(Wh + b − Rh). A worked example in D = 3, r = 1
    with R = [0, 0, 1] (the third axis), W = [1, 1, 0], b = 0.5, h = (1, 2, 3): Rh = 3 and
    Wh + b = 3.5, so Φ(h) = (1, 2, 3.5): only the third coordinate moves, to Wh + b."""
    site = utuning.SiteSpec("blocks.0", "block", 3, frozenset({"sequential"}))
    t = utuning.TUNERS.get("loreft")(site=site, rank=1, first=1, last=0)
    with torch.no_grad():
        t.basis.copy_(torch.tensor([[0.0], [0.0], [2.0]]))  # Q factor: (0, 0, ±1)
        t.source.weight.copy_(torch.tensor([[1.0, 1.0, 0.0]]))
        t.source.bias.fill_(0.5)
    r = t.rotation()
    with torch.no_grad():
        t.source.weight.mul_(r[0, 2].sign())  # R may come out as -e3: keep R·Φ(h) = Wh + b the same example
        t.source.bias.mul_(r[0, 2].sign())
    h = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])  # (B=1, N=2, D=3)
    out = h + t(h, None)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 2.0, 3.5], [4.0, 5.0, 6.0]]]))  # position 1 untouched


def test_loreft_edits_only_inside_the_subspace_at_the_chosen_positions():
    tuned = utuning.tune(utuning.wrap(tiny_vit().double()), [("loreft", "blocks.0", {"rank": 3, "first": 2, "last": 1})]).double()
    randomize_tuners(tuned, std=0.3)
    t = tuned.attached()[0].tuner
    r = t.rotation()
    torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=torch.float64))
    h = torch.randn(2, 6, 32, dtype=torch.float64)
    edit = t(h, None)
    assert torch.count_nonzero(edit[:, 2:5]) == 0 and torch.count_nonzero(edit[:, [0, 1, 5]]) > 0
    torch.testing.assert_close((h + edit)[:, 0] @ r.T, t.source(h[:, 0]))  # R Φ(h) = W h + b
    torch.testing.assert_close(edit[:, 0] - edit[:, 0] @ r.T @ r, torch.zeros(2, 32, dtype=torch.float64))


def test_adaption_prompt_is_zero_gated_attention_over_prompts():
    """LLaMA-Adapter (arXiv 2303.16199, Eq. 6-8): the prompts' softmax is separate from the
    sequence's and scaled by a zero-initialised gate, so the first step trains the gate only."""
    ref = tiny_vit().eval()
    tuned = utuning.tune(utuning.wrap(copy.deepcopy(ref)), [("adaption_prompt", "blocks.*.attn", {"tokens": 4})])
    images = {"pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        torch.testing.assert_close(call(tuned.eval(), images), ref(images["pixel_values"]))
    call(tuned.train(), images).pow(2).mean().backward()
    tuners = [a.tuner for a in tuned.attached()]
    assert all(t.gate.grad.abs().max() > 0 and t.prompts.grad.abs().max() == 0 for t in tuners)
    randomize_tuners(tuned)
    t, handle = tuners[0], tuned.backbone.slot("blocks.0.attn").handle
    x = torch.randn(2, 7, 32)
    q = handle.query(x)
    k, v = handle.raw_key_value(t.prompts.expand(2, -1, -1))
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, N, K)
    expected = handle.out_proj((t.gate * scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(t(x, handle), expected)


@pytest.mark.parametrize("specs", [
    [("loreft", "blocks.*", {"rank": 2, "first": 2, "last": 0})],
    [("adaption_prompt", "blocks.1.attn", {"tokens": 3})],
    [("vera", "blocks.*.attn.{q,v}", {"rank": 4}), ("fact", "blocks.*.mlp.{fc1,fc2}", {"rank": 4, "form": "tk"})],
], ids=["loreft", "adaption_prompt", "vera+fact"])
def test_on_a_tiny_bert(specs):
    """The same tuners on a text backbone with padded inputs: a classification loss moves every
    tuner parameter and no frozen one, and the state dict (shared state included) reloads."""
    make = lambda: utuning.tune(text_backbone("bert"), specs)  # noqa: E731
    tuned = make()
    inputs = padded_inputs(tuned.backbone)
    randomize_tuners(tuned, std=0.2)
    logits = call(tuned.train(), inputs)
    F.cross_entropy(logits, torch.arange(logits.shape[0]) % logits.shape[1]).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in tuned.trainable_parameters())
    assert all(p.grad is None for p in tuned.backbone.parameters() if not p.requires_grad)
    other = make().eval()
    other.load_tuner_state_dict(tuned.tuner_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(call(other, inputs), call(tuned.eval(), inputs))
