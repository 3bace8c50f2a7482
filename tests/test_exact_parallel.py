"""The exact parallel forms of U-Tuning (arXiv 2303.00690, Eq. 3-5) and Res-Tuning (arXiv 2310.19859,
Eq. 8-13), held to 1e-10 in float64:

    Attn(Q, [K_pre; K], [V_pre; V]) = (1 - λ)·Attn(Q, K, V) + λ·Attn(Q, K_pre, V_pre)
"""

from __future__ import annotations

import copy

import pytest
import torch

import utuning
from tests.helpers import one_thread, randomize_tuners, tiny_vit  # noqa: F401 (one_thread: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = {"atol": 1e-10, "rtol": 0}


@pytest.fixture(scope="module")
def setup():
    ref = tiny_vit(depth=3, reg_tokens=2).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return ref, x


def _tuned(ref, specs):
    return utuning.tune(utuning.wrap(copy.deepcopy(ref)), specs).double().eval()


def _parallel_attention(q, k, v, kp, vp, scale):
    """(1-λ)·Attn(Q,K,V) + λ·Attn(Q,Kp,Vp), λ the softmax mass on the prefix keys, written out."""
    s, sp = (q @ k.transpose(-2, -1)) * scale, (q @ kp.transpose(-2, -1)) * scale  # (B, H, N, N), (B, H, N, P)
    z, zp = s.exp().sum(-1, keepdim=True), sp.exp().sum(-1, keepdim=True)
    lam = zp / (z + zp)
    return (1 - lam) * (s.softmax(-1) @ v) + lam * (sp.softmax(-1) @ vp)


def _reference_logits(vit, x, prefixes):
    """A ViT forward written out by hand, with the prefix keys/values of each block."""
    t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # (B, N, D)
    for blk, (kp, vp) in zip(vit.blocks, prefixes):
        a = blk.attn
        b, n, _ = t.shape
        q, k, v = a.qkv(blk.norm1(t)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        o = _parallel_attention(q, k, v, kp.expand(b, -1, -1, -1), vp.expand(b, -1, -1, -1), a.scale)
        t = t + a.proj(o.transpose(1, 2).reshape(b, n, -1))
        t = t + blk.mlp(blk.norm2(t))
    return vit.forward_head(vit.norm(t))


def test_prefix_joint_equals_parallel_and_reference(setup):
    ref, x = setup
    joint = _tuned(ref, [("prefix", "blocks.*.attn", {"tokens": 4, "form": "joint"})])
    randomize_tuners(joint, std=0.5)
    parallel = _tuned(ref, [("prefix", "blocks.*.attn", {"tokens": 4, "form": "parallel"})])
    parallel.load_tuner_state_dict(joint.tuner_state_dict())
    assert all(a.tuner.decomposed for a in parallel.attached())
    assert not any(a.tuner.decomposed for a in joint.attached())
    state = joint.tuner_state_dict()
    prefixes = [(state[f"blocks.{i}.attn.prefix.key"], state[f"blocks.{i}.attn.prefix.value"]) for i in range(3)]
    with torch.no_grad():
        out_joint, out_parallel = joint(pixel_values=x), parallel(pixel_values=x)
        expected = _reference_logits(ref, x, prefixes)
        assert out_joint.dtype == torch.float64
        torch.testing.assert_close(out_parallel, out_joint, **EXACT)
        torch.testing.assert_close(out_joint, expected, **EXACT)
        torch.testing.assert_close(out_parallel, expected, **EXACT)
        assert not torch.allclose(out_joint, ref(x), atol=1e-3)


def test_attend_decomposed_equals_joint_with_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g) for _ in range(3))
    pre = [tuple(torch.randn(2, 3, n, 4, dtype=torch.float64, generator=g) for _ in range(2)) for n in (2, 3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    joint = utuning.attend(q, k, v, key_mask=mask, prefixes=pre)
    parallel = utuning.attend(q, k, v, key_mask=mask, prefixes=pre, decomposed=True)
    torch.testing.assert_close(parallel, joint, **EXACT)


@pytest.mark.parametrize("blocks", ["blocks.*", "blocks.1"])
def test_prompt_deep_equals_prompt_parallel(setup, blocks):
    """VPT-deep at blocks.{i} and prompt_parallel at blocks.{i}.attn, same prompt tokens: same logits
    (class-token pooling), because the prompts' own outputs are dropped after each block."""
    ref, x = setup
    deep = _tuned(ref, [("prompt", blocks, {"tokens": 5})])
    randomize_tuners(deep, std=0.5)
    par = _tuned(ref, [("prompt_parallel", f"{blocks}.attn", {"tokens": 5})])
    par.load_tuner_state_dict({k.replace(".prompt.", ".attn.prompt_parallel."): v
                               for k, v in deep.tuner_state_dict().items()})
    joint = _tuned(ref, [("prompt_parallel", f"{blocks}.attn", {"tokens": 5, "form": "joint"})])
    joint.load_tuner_state_dict(par.tuner_state_dict())
    with torch.no_grad():
        expected = deep(pixel_values=x)
        assert ref.global_pool == "token"
        torch.testing.assert_close(par(pixel_values=x), expected, **EXACT)
        torch.testing.assert_close(joint(pixel_values=x), expected, **EXACT)
        assert not torch.allclose(expected, ref(x), atol=1e-3)
