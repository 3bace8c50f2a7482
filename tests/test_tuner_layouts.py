"""Tuners that depend on the layout of a site's tokens: Convpass needs a 2-D grid (site feature
``spatial``) and is refused on text before anything is modified; LoReFT edits each row's first and
last REAL tokens (it takes the site's padding mask), so padding on either side changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import utuning
from tests.helpers import randomize_tuners, tiny_vit
from tests.test_beit import tiny_beit
from tests.test_convnext import tiny_convnext
from tests.test_eva import tiny_eva
from tests.test_hf_decoder import tiny_decoder
from tests.test_hf_vision import tiny_hf
from tests.test_swin import tiny_swin
from tests.text_helpers import tiny_text_model
from utuning.backbones.hf_decoder import HFDecoderBackbone
from utuning.backbones.hf_text import HFTextBackbone
from utuning.errors import PlacementError
from utuning.sites import SiteSpec

VISION = {"vit": tiny_vit, "swin": tiny_swin, "eva": tiny_eva, "beit": tiny_beit, "convnext": tiny_convnext,
          "hf_dinov2": lambda: tiny_hf("dinov2")}


@pytest.mark.parametrize("family", list(VISION))
def test_vision_operation_sites_declare_a_spatial_layout(family):
    backbone = utuning.wrap(VISION[family]())
    ops = {n: s for n, s in backbone.site_specs().items() if s.kind in ("attn", "mlp", "block")}
    assert ops and all("spatial" in s.features for s in ops.values())
    for spec in ops.values():
        if "parallel" in spec.placements:
            utuning.TUNERS.get("convpass").check_site(spec)  # accepted


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_convpass_on_text_is_refused_at_attach_naming_the_feature(family):
    backbone = HFTextBackbone(tiny_text_model("bert")) if family == "bert" else HFDecoderBackbone(tiny_decoder("llama"))
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    with pytest.raises(PlacementError, match=r"needs \['spatial'\].*blocks\.0.*no spatial layout \(text"):
        utuning.tune(backbone, [("convpass", "blocks.*.attn", {"hidden": 4})])
    assert all(len(slot) == 0 for slot in backbone.slots.values())
    assert all(torch.equal(v, before[k]) for k, v in backbone.model.state_dict().items())


def test_convpass_refusal_keeps_a_reason_the_site_gives():
    site = SiteSpec("blocks.0", "block", 8, frozenset({"parallel"}), refused={"spatial": "audio frames are 1-D"})
    with pytest.raises(PlacementError, match="audio frames are 1-D"):
        utuning.TUNERS.get("convpass").check_site(site)


def _loreft(first: int, last: int, dim: int = 8):
    site = SiteSpec("blocks.0", "block", dim, frozenset({"sequential"}))
    tuner = utuning.TUNERS.get("loreft")(site=site, rank=2, first=first, last=last)
    torch.nn.init.normal_(tuner.source.weight, std=1.0)
    return tuner


@pytest.mark.parametrize(("first", "last"), [(1, 2), (2, 0), (0, 1), (2, 3)])
def test_loreft_edits_exactly_the_first_and_last_real_tokens_of_each_row(first, last):
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0],    # right padding
                         [0, 0, 0, 1, 1, 1, 1, 1],    # left padding
                         [1, 1, 1, 1, 1, 1, 1, 1],    # none
                         [0, 0, 0, 0, 0, 1, 1, 0],    # two real tokens: fewer than first + last
                         [1, 1, 0, 0, 1, 1, 1, 1]]).bool()  # prompts before left padding (decoders)
    tuner = _loreft(first, last)
    edit = tuner(torch.randn(5, 8, 8), None, mask=mask)  # (B, N, D)
    for row, m in zip(edit, mask):
        real = m.nonzero().flatten().tolist()
        want = set(real[:first]) | set(real[max(len(real) - last, first):])
        assert set((row.abs().sum(-1) > 0).nonzero().flatten().tolist()) == want
    no_mask = tuner(torch.randn(2, 8, 8), None)  # vision: every token real
    want = set(range(first)) | set(range(max(8 - last, first), 8))
    assert set((no_mask.abs().sum((0, 2)) > 0).nonzero().flatten().tolist()) == want


def _rows_alone_match(backbone_output, tuned, inputs, atol=1e-5):
    """Final hidden states at every row's real tokens equal those of the row run alone, unpadded."""
    padded = backbone_output(tuned, inputs)
    for r, m in enumerate(inputs["attention_mask"].bool()):
        alone = {k: v[r : r + 1, m] for k, v in inputs.items()}
        torch.testing.assert_close(padded[r, m], backbone_output(tuned, alone)[0], atol=atol, rtol=0)


def _final(tuned, inputs):
    return tuned.backbone.intermediates(**inputs, layers=[0]).final  # (B, N, D)


@torch.no_grad()
def test_loreft_on_right_padded_bert_equals_each_row_alone():
    hf = tiny_text_model("bert")
    tuned = utuning.tune(HFTextBackbone(copy.deepcopy(hf)), [("loreft", "blocks.*", {"rank": 2, "first": 1, "last": 2})])
    randomize_tuners(tuned, std=0.3)
    tuned.eval()
    inputs = tuned.backbone.example_inputs(4, 9)
    inputs["attention_mask"][2, 5:] = 0  # rows 1, 3: 3 padding tokens (example_inputs); row 2: 4
    inputs["input_ids"][2, 5:] = hf.config.pad_token_id
    assert (inputs["attention_mask"][:, -1] == 0).any()
    _rows_alone_match(_final, tuned, inputs)
    untuned = HFTextBackbone(copy.deepcopy(hf)).intermediates(**inputs, layers=[0]).final
    last = inputs["attention_mask"].sum(1) - 1  # the last real token of each row is edited
    moved = (_final(tuned, inputs) - untuned)[torch.arange(4), last].abs().amax(-1)
    assert (moved > 1e-3).all()


@torch.no_grad()
def test_loreft_on_left_padded_llama_equals_each_row_alone():
    hf = tiny_decoder("llama")
    specs = [("loreft", "blocks.*", {"rank": 2, "first": 1, "last": 2}), ("loreft", "blocks.0.mlp", {"rank": 2})]
    tuned = utuning.tune(HFDecoderBackbone(copy.deepcopy(hf)), specs)
    randomize_tuners(tuned, std=0.3)
    tuned.eval()
    inputs = tuned.backbone.example_inputs(4, 9)
    for r in range(4):  # padding moved to the left
        n = int(inputs["attention_mask"][r].sum())
        inputs = {k: v.clone() for k, v in inputs.items()}
        for k in inputs:
            inputs[k][r] = torch.cat([inputs[k][r, n:], inputs[k][r, :n]])
    assert (inputs["attention_mask"][:, 0] == 0).any()
    _rows_alone_match(_final, tuned, inputs)
    logits = tuned(**inputs)  # (B, N, V): the last position is each row's last real token
    for r, m in enumerate(inputs["attention_mask"].bool()):
        alone = tuned(**{k: v[r : r + 1, m] for k, v in inputs.items()})
        torch.testing.assert_close(logits[r, -1], alone[0, -1], atol=1e-5, rtol=0)
