"""``utuning export --format weights``: merged weights in the form the family's own library loads.

Hugging Face backbones become a folder that ``from_pretrained`` loads (config, weights, tokenizer or
image-processor file) with the tuned model's outputs; timm backbones stay one safetensors file.
Each checkpoint is a real one (``save_checkpoint`` of a model whose tuners were moved off their
identity init), exported through ``utuning.cli.main``; the reference is the tuned model before merge.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import transformers as tf

from tests.helpers import randomize_tuners
from tests.test_engine import TINY_VIT
from tests.test_hf_decoder import tiny_tokenizer
from utuning.backbones.hf_decoder import TINY_GPT2
from utuning.backbones.hf_text import TINY
from utuning.build import build_model
from utuning.checkpoint import export_backbone, save_checkpoint
from utuning.cli import main
from utuning.errors import ConfigError
from utuning.schema import BackboneConfig, DataConfig, Recipe, TunerConfig

LORA_BITFIT = [TunerConfig(name="lora", at="blocks.*.attn.{q,v}", args={"rank": 2}),
               TunerConfig(name="bitfit", at=["blocks.*.attn.proj", "blocks.*.mlp.fc2"])]
VIT_ARGS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "patch_size": 8, "image_size": 32}


def checkpoint(run: Path, backbone: BackboneConfig, tuners: list[TunerConfig], classes: int = 3):
    """A run folder with one checkpoint of ``tuners`` moved off their init; returns (run, tuned model)."""
    recipe = Recipe(name="export", backbone=backbone, tuners=tuners, data=DataConfig(name="tiny"))
    model = build_model(recipe, num_classes=classes).eval()
    randomize_tuners(model, std=0.2)
    save_checkpoint(run / "checkpoints", step=1, tuner_state=model.tuner_state_dict(), recipe=recipe,
                    num_classes=classes, tuners=model.tuner_config())
    return run, model


def export(run: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["export", str(run), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny BERT classifier (hidden 32, 2 layers) with a WordPiece tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "##s", "ran"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = tf.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = tf.AutoConfig.for_model("bert", num_labels=3, **TINY)
    tf.AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_bert_lora_bitfit_exports_a_folder_hf_loads_with_the_tuned_outputs(bert_folder, tmp_path, capsys):
    backbone = BackboneConfig(name="hf_text", model=str(bert_folder), pretrained=True, num_classes=3)
    run, tuned = checkpoint(tmp_path / "run", backbone, [*LORA_BITFIT, TunerConfig(name="full", at="head")])
    code, said = export(run, tmp_path / "merged", capsys)
    assert code == 0, said
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= files, files
    assert "tokenizer" in said and not list(tmp_path.glob(".merged.tmp-*"))
    inputs = tuned.backbone.example_inputs(3, 8)  # every second row padded by 3 tokens
    assert (inputs["attention_mask"] == 0).any()
    encoder = tf.AutoModel.from_pretrained(tmp_path / "merged").eval()
    classifier = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    untuned = tf.AutoModelForSequenceClassification.from_pretrained(bert_folder).eval()
    with torch.no_grad():
        final = tuned.backbone.intermediates(**inputs, layers=[]).final
        torch.testing.assert_close(encoder(**inputs).last_hidden_state, final, atol=1e-5, rtol=1e-5)
        logits = tuned(**inputs)
        torch.testing.assert_close(classifier(**inputs).logits, logits, atol=1e-5, rtol=1e-5)  # head: `full`, trained
        assert not torch.allclose(untuned(**inputs).logits, logits, atol=1e-3)  # the merge is not a no-op
    text = "the cat sat on a mat"
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "merged")(text)["input_ids"] == \
        tuned.backbone.tokenizer(text)["input_ids"]


def test_a_head_that_is_not_the_models_own_stays_in_the_checkpoint_and_is_named(bert_folder, tmp_path, capsys):
    """BERT's head is pooler + classifier, which linear_probe (on the [CLS] state) does not map onto."""
    backbone = BackboneConfig(name="hf_text", model=str(bert_folder), pretrained=True, num_classes=3)
    run, tuned = checkpoint(tmp_path / "run", backbone, [*LORA_BITFIT, TunerConfig(name="linear_probe", at="head")])
    code, said = export(run, tmp_path / "merged", capsys)
    assert code == 0, said
    assert "head tuner head.linear_probe is not in it (the frozen head is ['bert.pooler', 'classifier']" in said
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged.classifier.weight, tuned.backbone.model.classifier.weight)  # the frozen one


def test_hf_text_options_the_hf_model_lacks_are_refused_or_said(bert_folder, tmp_path, capsys):
    """position_offset (PEFT's prefix layout) would change HF's outputs: refused; mean pooling: a note."""
    shifted = BackboneConfig(name="hf_text", model=str(bert_folder), pretrained=True, num_classes=3,
                             args={"position_offset": 2})
    run, _ = checkpoint(tmp_path / "shifted", shifted, LORA_BITFIT)
    code, said = export(run, tmp_path / "merged", capsys)
    assert code == 2 and "position_offset=2" in said and not (tmp_path / "merged").exists()
    mean = BackboneConfig(name="hf_text", model=str(bert_folder), pretrained=True, num_classes=3,
                          args={"pooling": "mean"})
    run, _ = checkpoint(tmp_path / "mean", mean, LORA_BITFIT)
    code, said = export(run, tmp_path / "merged", capsys)
    assert code == 0 and "pooling='mean' is not part of the HF model" in said


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    """A tiny HF ViT image classifier (hidden 32, 2 layers, 32x32 images) and its image processor."""
    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    tf.ViTForImageClassification(tf.ViTConfig(num_labels=3, **VIT_ARGS)).save_pretrained(folder)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf_vit_folder_has_the_trained_linear_head_and_the_image_processor(vit_folder, tmp_path, capsys):
    backbone = BackboneConfig(name="hf_vision", model=str(vit_folder), pretrained=True, num_classes=3)
    run, tuned = checkpoint(tmp_path / "run", backbone, [TunerConfig(name="lora", at="blocks.*.attn.{q,v}",
                                                                     args={"rank": 2}),
                                                         TunerConfig(name="linear_probe", at="head")])
    code, said = export(run, tmp_path / "merged", capsys)
    assert code == 0, said
    assert "head tuners written into the model's own head: ['head.linear_probe']" in said
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()
    processor = tf.AutoImageProcessor.from_pretrained(tmp_path / "merged")
    assert processor.size == {"height": 32, "width": 32}
    merged = tf.AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=x).logits, tuned(pixel_values=x), atol=1e-5, rtol=1e-5)


def test_folder_export_refuses_unfoldable_tuners_and_wrong_targets_writing_nothing(vit_folder, tmp_path, capsys):
    backbone = BackboneConfig(name="hf_vision", model=str(vit_folder), pretrained=True, num_classes=3)
    run, _ = checkpoint(tmp_path / "adapter", backbone, [TunerConfig(name="p_adapter", at="blocks.*.mlp",
                                                                     args={"hidden": 4})])
    code, said = export(run, tmp_path / "merged", capsys)
    assert code == 2 and "p_adapter" in said and "cannot be folded" in said
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))
    run, _ = checkpoint(tmp_path / "lora", backbone, [TunerConfig(name="lora", at="blocks.*.attn.q")])
    (tmp_path / "a_file").write_text("keep")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep")
    for out, why in [(tmp_path / "a_file", "is a file"), (tmp_path / "full", "with files in it"),
                     (tmp_path / "w.safetensors", "names a file")]:
        code, said = export(run, out, capsys)
        assert code == 2 and why in said, said
    assert (tmp_path / "a_file").read_text() == "keep" and [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    assert not (tmp_path / "w.safetensors").exists()
    (tmp_path / "empty").mkdir()  # an empty folder is filled
    assert export(run, tmp_path / "empty", capsys)[0] == 0 and (tmp_path / "empty" / "config.json").is_file()


def test_gpt2_lora_exports_a_causal_lm_folder_with_its_tokenizer(tmp_path, capsys):
    tok = tiny_tokenizer()
    hf = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model("gpt2", pad_token_id=0, bos_token_id=1,
                                                                      eos_token_id=2, **TINY_GPT2))
    hf.resize_token_embeddings(len(tok))
    hf.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    backbone = BackboneConfig(name="hf_decoder", model=str(tmp_path / "gpt2"), pretrained=True)
    run, tuned = checkpoint(tmp_path / "run", backbone, [TunerConfig(name="lora", at="blocks.*.attn.qkv",
                                                                     args={"rank": 2})])
    code, said = export(run, tmp_path / "merged", capsys)
    assert code == 0, said
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied
    inputs = tuned.backbone.example_inputs(3)
    real = inputs["attention_mask"].bool()  # right-padded rows: compare the real tokens' logits
    assert not real.all()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits[real], tuned(**inputs)[real], atol=1e-5, rtol=1e-5)
    text = "the cat sat"
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "merged")(text)["input_ids"] == tok(text)["input_ids"]


def test_timm_file_holds_the_trained_linear_head_and_refuses_a_folder(tmp_path, capsys):
    backbone = BackboneConfig(name="vit", model="vit_tiny_patch16_224", img_size=32, args=dict(TINY_VIT))
    run, tuned = checkpoint(tmp_path / "run", backbone, [TunerConfig(name="lora", at="blocks.*.attn.qkv",
                                                                     args={"rank": 2}),
                                                         TunerConfig(name="linear_probe", at="head")], classes=4)
    (tmp_path / "folder").mkdir()
    code, said = export(run, tmp_path / "folder", capsys)
    assert code == 2 and "exports one safetensors file" in said
    code, said = export(run, tmp_path / "w.safetensors", capsys)
    assert code == 0 and "['head.linear_probe']" in said, said
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=4, img_size=32,
                              pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors"), "num_classes": 4},
                              **TINY_VIT).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), tuned(pixel_values=x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="is a folder"):
        export_backbone(run, str(tmp_path / "new") + "/")
