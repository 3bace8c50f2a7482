"""``torch.compile`` gives the eager outputs and gradients, and the same tuner state-dict keys.

CPU inductor compiles took ~90 s for the first two cases on the shared 2-core machine (with the
same outputs), so these tests use ``backend="aot_eager"``: Dynamo traces the tuned forward (slots, prompt insertion, prefix
attention) into one graph and AOTAutograd builds its backward, which is what can break.
"""

from __future__ import annotations

import pytest
import torch

import utuning
from tests.helpers import one_thread, randomize_tuners, tiny_vit  # noqa: F401 (one_thread: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "dual_u_tuner": [("dual_u_tuner", "blocks.*", {"hidden": 4}), ("linear_probe", "head")],
    "prefix": [("prefix", "blocks.*.attn", {"tokens": 3})],
    "prompts": [("prompt", "embed", {"tokens": 2}), ("prompt", "blocks.*", {"tokens": 3}), ("lora", "blocks.*.attn.qkv", {})],
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_eager(name):
    torch._dynamo.reset()
    tuned = utuning.tune(utuning.wrap(tiny_vit()), CASES[name]).eval()
    randomize_tuners(tuned)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(tuned, backend="aot_eager", fullgraph=True)
    assert utuning.unwrap(compiled) is tuned
    assert list(utuning.unwrap(compiled).tuner_state_dict()) == list(tuned.tuner_state_dict())

    def run(model):
        for p in tuned.parameters():
            p.grad = None
        out = model(pixel_values=x)
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tuned.named_trainable_parameters()}

    out_eager, grads_eager = run(tuned)
    out_comp, grads_comp = run(compiled)
    torch.testing.assert_close(out_comp, out_eager, atol=1e-5, rtol=1e-5)
    for n, g in grads_eager.items():
        torch.testing.assert_close(grads_comp[n], g, atol=1e-5, rtol=1e-4, msg=n)
