"""Tunable parameter counts on ViT-B/16 with a 100-class head (U-Tuning, arXiv 2303.00690, Table 2;
VPT, arXiv 2203.12119). Every count includes the trainable ``linear_probe`` head (768·100 + 100)."""

from __future__ import annotations

import pytest

import utuning
from tests.helpers import one_thread  # noqa: F401 (fixture)
from utuning.model import _millions

pytestmark = pytest.mark.usefixtures("one_thread")

D, L, HEAD = 768, 12, 768 * 100 + 100
BOTTLENECK = (D * 10 + 10) + (10 * D + D)  # down + up, bottleneck 10

CASES = {
    "linear_probe": ([], HEAD, "0.08M"),
    "vpt_shallow_10": ([("prompt", "embed", {"tokens": 10})], 10 * D + HEAD, "0.08M"),
    "vpt_deep_10": ([("prompt", "blocks.*", {"tokens": 10})], L * 10 * D + HEAD, "0.17M"),
    "prefix_10": ([("prefix", "blocks.*.attn", {"tokens": 10})], L * 2 * 10 * D + HEAD, "0.26M"),
    "pfeiffer_adapter_10": ([("pfeiffer_adapter", "blocks.*", {"hidden": 10})], L * BOTTLENECK + HEAD, "0.27M"),
    "dual_p_adapter_10_channel": ([("dual_u_tuner", "blocks.*", {"tuner": "p_adapter", "hidden": 10, "scale": "channel"})],
                                  2 * L * (BOTTLENECK + D) + HEAD, "0.48M"),
}


@pytest.fixture(scope="module")
def vit_b():
    """ViT-B/16, 100 classes, random weights, built once offline."""
    return utuning.build_backbone("vit", model="vit_base_patch16_224", pretrained=False, num_classes=100)


def test_exact_integers():
    assert HEAD == 76_900
    assert {k: v[1] for k, v in CASES.items()} == {
        "linear_probe": 76_900, "vpt_shallow_10": 84_580, "vpt_deep_10": 169_060, "prefix_10": 261_220,
        "pfeiffer_adapter_10": 270_556, "dual_p_adapter_10_channel": 482_644,
    }


@pytest.mark.parametrize("case", list(CASES))
def test_vit_b_counts(vit_b, case):
    specs, expected, rounded = CASES[case]
    tuned = utuning.TunedModel(vit_b, [*specs, ("linear_probe", "head")])
    try:
        tunable, total = tuned.num_parameters()
        assert tunable == expected
        assert _millions(tunable) == rounded
        assert total == 85_875_556 + tunable  # ViT-B/16-100 (its frozen head included) plus the tuners
        assert sum(r["parameters"] for r in tuned.summary()) == tunable
        assert tuned.format_summary().splitlines()[-1].endswith(f"{rounded})")
    finally:  # the shared backbone is reused by the next case: take the tuners off again
        for a in tuned.attached():
            vit_b.slot(a.sites[0]).remove(a.tuner.name)
