"""Ours against the reference: each method HF PEFT implements, with the same weights in PEFT and in
utuning (read from PEFT's own adapter folder), gives the same outputs (1e-5) on a tiny timm ViT and
a tiny BERT, before and after merging; written back as a PEFT folder (PEFT -> ours -> PEFT), PEFT
loads it with the same outputs again. A method the installed PEFT cannot run on the installed
transformers/timm is skipped with the reason."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import utuning
from tests.helpers import one_thread, tiny_vit  # noqa: F401 (one_thread: fixture)
from tests.text_helpers import padded_inputs, tiny_text_model
from utuning.peft_format import export_peft, load_peft

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

VIT = {  # id -> (PEFT config class, kwargs)
    "lora": ("LoraConfig", {"r": 2, "lora_alpha": 4, "target_modules": ["qkv", "fc1"], "modules_to_save": ["head"],
                            "rank_pattern": {"fc1": 3}, "alpha_pattern": {"fc1": 5.0}}),
    "dora": ("LoraConfig", {"r": 2, "lora_alpha": 4, "target_modules": ["qkv", "attn.proj"], "use_dora": True}),
    "rslora": ("LoraConfig", {"r": 4, "lora_alpha": 4, "target_modules": ["fc2"], "use_rslora": True}),
    "pissa": ("LoraConfig", {"r": 2, "target_modules": ["fc1"], "init_lora_weights": "pissa"}),
    "olora": ("LoraConfig", {"r": 2, "target_modules": ["qkv"], "init_lora_weights": "olora"}),
    "loha": ("LoHaConfig", {"r": 2, "alpha": 4, "target_modules": ["qkv", "fc1"]}),
    "lokr": ("LoKrConfig", {"r": 2, "alpha": 4, "target_modules": ["qkv", "fc2"]}),
    "lokr-both": ("LoKrConfig", {"r": 1, "target_modules": ["fc1"], "decompose_both": True}),
    "oft": ("OFTConfig", {"r": 0, "oft_block_size": 8, "target_modules": ["qkv", "fc1"]}),
    "oft-exact-shared": ("OFTConfig", {"r": 0, "oft_block_size": 16, "target_modules": ["attn.proj"], "block_share": True,
                                       "use_cayley_neumann": False}),
    "ln_tuning": ("LNTuningConfig", {"target_modules": r".*\.norm[12]|norm"}),
    "ia3": ("IA3Config", {"target_modules": ["qkv", "fc2"], "feedforward_modules": ["fc2"]}),
    "vera": ("VeraConfig", {"r": 4, "target_modules": ["fc1", "fc2"]}),
}
BERT = {
    "lora": ("LoraConfig", {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"],
                            "modules_to_save": ["classifier"], "layers_to_transform": [1]}),
    "dora": ("LoraConfig", {"r": 2, "target_modules": ["key", "attention.output.dense"], "use_dora": True}),
    "rslora-seq-cls": ("LoraConfig", {"r": 4, "lora_alpha": 4, "target_modules": ["query"], "use_rslora": True,
                                      "task_type": "SEQ_CLS"}),
    "pissa": ("LoraConfig", {"r": 2, "target_modules": ["value"], "init_lora_weights": "pissa"}),
    "olora": ("LoraConfig", {"r": 2, "target_modules": ["key"], "init_lora_weights": "olora"}),
    "loha": ("LoHaConfig", {"r": 2, "target_modules": ["query", "intermediate.dense"]}),
    "lokr": ("LoKrConfig", {"r": 2, "target_modules": ["value", "output.dense"]}),
    "oft": ("OFTConfig", {"r": 0, "oft_block_size": 8, "target_modules": ["query", "value"]}),
    "ln_tuning": ("LNTuningConfig", {"target_modules": ["LayerNorm"]}),
    "ia3": ("IA3Config", {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}),
    "vera": ("VeraConfig", {"r": 4, "target_modules": ["query", "value"]}),
}


def bert_base():
    """Tiny BERT with a unit-scale classifier, so logits are O(1) and 1e-5 is a strict tolerance."""
    base = tiny_text_model("bert")
    with torch.no_grad():
        base.classifier.weight.normal_(generator=torch.Generator().manual_seed(5))
    return base


def randomize_peft(model, seed: int = 3, std: float = 0.1) -> None:
    """Move every trainable PEFT weight off its initialisation (OFT's generators stay small)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (std / 4 if "oft_R" in name else std))


def peft_model(base, cls_name: str, kwargs: dict):
    """PEFT's model on a copy of ``base`` (random adapter weights), or a skip with PEFT's reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls_name)(**kwargs))
    except Exception as e:  # noqa: BLE001 (any failure inside PEFT is a skip, with its reason)
        pytest.skip(f"the installed peft {peft.__version__} cannot build {cls_name}{kwargs} here: {e!r}")
    randomize_peft(model)
    return model.eval()


def _from_pretrained(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def check_round_trip(theirs, base, run, tmp_path) -> utuning.TunedModel:
    """PEFT's folder -> ours: equal outputs, merged too; ours -> a PEFT folder -> PEFT: equal again."""
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = load_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    export_peft(ours, tmp_path / "ours", base_model_name_or_path="tiny")
    again = _from_pretrained(base, tmp_path / "ours")
    with torch.no_grad():
        expected = run(theirs)
        assert not torch.allclose(expected, run(base), atol=1e-4), "the adapter does not change the outputs"
        torch.testing.assert_close(run(ours), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(run(again), expected, atol=1e-5, rtol=0)
        if any(a.tuner.placement == "reparam" for a in ours.attached()):
            ours.merge()
            torch.testing.assert_close(run(ours), expected, atol=1e-5, rtol=0)
            ours.unmerge()
            torch.testing.assert_close(run(ours), expected, atol=1e-5, rtol=0)
    return ours


@pytest.mark.parametrize("case", list(VIT))
def test_equal_to_peft_on_timm_vit(case, tmp_path):
    base = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    theirs = peft_model(base, *VIT[case])
    ours = check_round_trip(theirs, base, lambda m: m(pixel_values=x) if isinstance(m, utuning.TunedModel) else m(x),
                            tmp_path)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ours.trainable_parameters()) >= n_theirs


@pytest.mark.parametrize("case", list(BERT))
def test_equal_to_peft_on_bert(case, tmp_path):
    base = bert_base()
    inputs = padded_inputs(utuning.wrap(copy.deepcopy(base)))
    theirs = peft_model(base, *BERT[case])

    def run(m):
        out = m(**inputs)
        return out if isinstance(out, torch.Tensor) else out.logits

    check_round_trip(theirs, base, run, tmp_path)
