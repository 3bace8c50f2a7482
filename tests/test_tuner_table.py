"""Registry-driven checks: every registered tuner and composition has a case in
``tests/tuner_cases.py`` (or a documented exemption), and every mergeable case merges exactly."""

from __future__ import annotations

import copy

import pytest
import torch

import utuning
from tests.helpers import call, one_thread, randomize_tuners, tiny_vit  # noqa: F401 (one_thread: fixture)
from tests.tuner_cases import CASES, EXEMPT

pytestmark = pytest.mark.usefixtures("one_thread")


def _names(specs) -> set[str]:
    """Tuner and composition names a case uses, compositions expanded."""
    coerced = [utuning.TunerSpec.coerce(s) for s in specs]
    return {s.name for s in coerced} | {s.name for s in utuning.expand_specs(coerced)}


def uncovered(registered: set[str]) -> list[str]:
    """Names in ``registered`` with neither a case nor an exemption."""
    covered = set().union(*(_names(c.values[0]) for c in CASES))
    return sorted(registered - covered - set(EXEMPT))


def test_every_registered_tuner_and_composition_has_a_case():
    registered = set(utuning.TUNERS) | set(utuning.COMPOSITIONS)
    missing = uncovered(registered)
    assert not missing, (f"registered without a case in tests/tuner_cases.py: {missing}; add a case "
                         "(or an EXEMPT entry with the reason)")
    stale = sorted(set(EXEMPT) - registered)
    assert not stale, f"EXEMPT names that are not registered: {stale}"
    assert all(isinstance(why, str) and len(why) > 20 for why in EXEMPT.values()), "every exemption needs a reason"


def test_the_coverage_check_sees_a_new_name():
    """A name registered without a case is reported (the check above is not vacuous)."""
    assert uncovered({"vera", "lora", "difffit", "unlisted_new_tuner"}) == ["unlisted_new_tuner"]


MERGEABLE = [c for c in CASES if all(
    utuning.TUNERS.get(s.name).placement == "reparam" for s in utuning.expand_specs(c.values[0]))]


@pytest.mark.parametrize(("specs", "identity"), MERGEABLE)
def test_merge_equals_unmerged_and_unmerge_restores(specs, identity):
    """Folding every tuner into the frozen weights keeps the outputs (float64, off-init tuners), and
    unmerging restores the frozen weights."""
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tuned = utuning.tune(utuning.wrap(tiny_vit().double()), specs).double().eval()
    randomize_tuners(tuned, std=0.2)
    frozen = copy.deepcopy(tuned.backbone.frozen_state_dict())
    with torch.no_grad():
        before = call(tuned, {"pixel_values": images})
        tuned.merge()
        merged = call(tuned, {"pixel_values": images})
        changed = any(not torch.equal(v, frozen[k]) for k, v in tuned.backbone.frozen_state_dict().items())
        tuned.unmerge()
        after = call(tuned, {"pixel_values": images})
    assert changed, "merge did not change the frozen weights"
    torch.testing.assert_close(merged, before, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(after, before, atol=1e-9, rtol=1e-9)
    for k, v in tuned.backbone.frozen_state_dict().items():
        torch.testing.assert_close(v, frozen[k], atol=1e-10, rtol=1e-10, msg=k)
