"""Tunable parameter counts on ViT-B/16 with a 100-class head (U-Tuning, arXiv 2303.00690, Table 2;
VPT, arXiv 2203.12119). Every count includes the trainable ``linear_probe`` head (768·100 + 100)."""

from __future__ import annotations

import pytest

import utuning
from tests.helpers import one_thread  # noqa: F401 (fixture)
from utuning.model import _millions

pytestmark = pytest.mark.usefixtures("one_thread")

# Expected counts are the numbers, not formulas over the same constants: D = 768, L = 12 blocks, a 100-class
# head 768·100 + 100 = 76,900, a bottleneck-10 adapter (768·10 + 10) + (10·768 + 768) = 16,138.
CASES = {
    "linear_probe": ([], 76_900, "0.08M"),
    "vpt_shallow_10": ([("prompt", "embed", {"tokens": 10})], 84_580, "0.08M"),  # + 10·768
    "vpt_deep_10": ([("prompt", "blocks.*", {"tokens": 10})], 169_060, "0.17M"),  # + 12·10·768
    "prefix_10": ([("prefix", "blocks.*.attn", {"tokens": 10})], 261_220, "0.26M"),  # + 12·2·10·768
    "pfeiffer_adapter_10": ([("pfeiffer_adapter", "blocks.*", {"hidden": 10})], 270_556, "0.27M"),  # + 12·16,138
    "dual_p_adapter_10_channel": ([("dual_u_tuner", "blocks.*", {"tuner": "p_adapter", "hidden": 10, "scale": "channel"})],
                                  482_644, "0.48M"),  # + 2·12·(16,138 + 768)
}


@pytest.fixture(scope="module")
def vit_b():
    """ViT-B/16, 100 classes, random weights, built once offline."""
    return utuning.build_backbone("vit", model="vit_base_patch16_224", pretrained=False, num_classes=100)


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
