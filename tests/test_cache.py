"""The frozen-feature cache: hits, misses, invalidation, corruption, partial entries,
augmentation refusal, and training from the cache equal to training on live features."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import utuning
from tests.helpers import tiny_vit
from tests.test_side_tuners import CountingViT, StubText
from utuning.cache import FeatureCache, random_augmentation
from utuning.data.base import file_identity
from utuning.errors import CacheError


class Images(Dataset):
    """Ten 32x32 images with labels; ``transform`` applied in ``__getitem__``."""

    def __init__(self, n: int = 10, seed: int = 0, transform=None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.transform = transform
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        x = self.x[i]
        return (self.transform(x) if self.transform is not None else x), self.y[i]


class Fingerprinted(Images):
    version = "v1"

    def fingerprint(self) -> str:
        return f"images-{self.version}"


def side_model(seed: int = 0, **args) -> utuning.TunedModel:
    torch.manual_seed(seed)
    return utuning.tune(CountingViT(tiny_vit(depth=2)),
                        [("ytuning", "blocks.*", {"num_labels": 3, "dropout": 0.0, **args})])


def entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_build_then_hit_without_running_the_backbone(tmp_path):
    model, data = side_model(), Images()
    cached = FeatureCache(tmp_path, shard_size=4).dataset(model, data, batch_size=3)
    assert model.backbone.calls == 4 and len(cached) == 10  # ceil(10 / 3) batches
    manifest = json.loads((tmp_path / cached.key / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    shard = load_file(str(tmp_path / cached.key / manifest["shards"][0]["file"]))
    assert shard["layer.0"].shape == (4, 17, 32) and shard["pooled"].shape == (4, 32)
    assert manifest["shards"][0]["tensors"]["layer.1"] == {"shape": [4, 17, 32], "dtype": "torch.float32"}

    model.backbone.calls = 0
    again = FeatureCache(tmp_path).dataset(model, data, batch_size=3)
    assert model.backbone.calls == 0 and again.key == cached.key and entries(tmp_path) == [cached.key]

    feats, target = cached.collate([cached[i] for i in (8, 1, 9)])  # across shards
    with torch.no_grad():
        live = model.backbone.intermediates(data.x[[8, 1, 9]], layers=[0, 1])
    for i in (0, 1):
        torch.testing.assert_close(feats.layers[i], live.layers[i])
    torch.testing.assert_close(feats.pooled, live.pooled)
    assert torch.equal(target, data.y[[8, 1, 9]]) and feats.extra == {"prefix_tokens": 1}


def test_training_from_the_cache_equals_training_on_live_features(tmp_path):
    data = Images(n=8)

    def train(use_cache: bool) -> list[float]:
        model = side_model(seed=3).train()
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
        if use_cache:
            cached = FeatureCache(tmp_path).dataset(model, data, batch_size=8)
            batches = [(model.side_forward, f) for f, _ in DataLoader(cached, batch_size=4, collate_fn=cached.collate)]
            model.backbone.calls = 0
        else:
            batches = [(lambda x, m=model: m(pixel_values=x), data.x[i:i + 4]) for i in (0, 4)]
        losses = []
        for _ in range(3):
            for (fn, inputs), start in zip(batches, (0, 4)):
                loss = F.cross_entropy(fn(inputs), data.y[start:start + 4])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        if use_cache:
            assert model.backbone.calls == 0
        assert all(p.grad is None for p in model.backbone.parameters())
        return losses

    live, cached = train(False), train(True)
    assert len(set(live)) > 1  # it trains
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(live), atol=1e-5, rtol=1e-5)


def test_any_change_gives_a_new_entry(tmp_path):
    cache = FeatureCache(tmp_path)
    model, data = side_model(), Images()
    base = cache.dataset(model, data, batch_size=5).key
    keys = {base, cache.dataset(model, data, batch_size=5, layers=[1]).key}
    data.x[3, 0, 0, 0] += 1.0  # data
    keys.add(cache.dataset(model, data, batch_size=5).key)
    data.transform = transforms.Normalize([0.5] * 3, [0.2] * 3)  # transform
    keys.add(cache.dataset(model, data, batch_size=5).key)
    data.transform = None
    data.x[3, 0, 0, 0] -= 1.0
    with torch.no_grad():
        model.backbone.model.blocks[1].mlp.fc2.bias[0] += 0.1  # backbone weights
    keys.add(cache.dataset(model, data, batch_size=5).key)
    model.backbone.model.global_pool = "avg"  # how pooled features are formed (backbone.feature_options)
    keys.add(cache.dataset(model, data, batch_size=5).key)
    assert len(keys) == 6 and len(entries(tmp_path)) == 6 and cache.builds == 6


def test_dataset_fingerprint_replaces_sample_hashing(tmp_path):
    model, data = side_model(), Fingerprinted()
    cache = FeatureCache(tmp_path)
    first = cache.dataset(model, data, batch_size=10)
    assert data.reads == 10  # read once, to build; not to hash
    data.reads = 0
    assert cache.dataset(model, data, batch_size=10).key == first.key and data.reads == 0
    data.version = "v2"
    assert cache.dataset(model, data, batch_size=10).key != first.key


@pytest.mark.parametrize("damage, match", [
    ("flip", "sha256"),
    ("complete", "COMPLETE"),
    ("shard", "missing"),
    ("manifest", "manifest"),
    ("file", "Not a directory"),  # the entry's folder replaced by a plain file
])
def test_damaged_entries_are_rebuilt(tmp_path, damage, match):
    model, data = side_model(), Images()
    clean = FeatureCache(tmp_path, shard_size=4).dataset(model, data, batch_size=5)
    reference = clean.collate([clean[i] for i in range(10)])
    path = tmp_path / clean.key
    shard = path / "shard-00001.safetensors"
    if damage == "flip":
        raw = bytearray(shard.read_bytes())
        raw[-5] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif damage == "complete":
        (path / "COMPLETE").unlink()
    elif damage == "shard":
        shard.unlink()
    elif damage == "manifest":
        (path / "manifest.json").write_text("{not json")
    else:
        shutil.rmtree(path)
        path.write_text("not a cache entry")
    cache = FeatureCache(tmp_path, shard_size=4)
    with pytest.warns(UserWarning, match=match):
        rebuilt = cache.dataset(model, data, batch_size=5)
    assert cache.builds == 1 and rebuilt.key == clean.key
    feats, target = rebuilt.collate([rebuilt[i] for i in range(10)])
    torch.testing.assert_close(feats.layers[1], reference[0].layers[1], rtol=0, atol=0)
    assert torch.equal(target, reference[1])


@pytest.mark.parametrize("transform, name", [
    (transforms.Compose([transforms.RandomHorizontalFlip()]), "RandomHorizontalFlip"),
    (transforms.RandomApply([transforms.ColorJitter(0.2)]), "RandomApply"),
    (transforms.Compose([transforms.Normalize([0.0] * 3, [1.0] * 3), transforms.RandAugment()]), "RandAugment"),
    (transforms.TrivialAugmentWide(), "TrivialAugmentWide"),
])
def test_random_augmentation_is_refused(tmp_path, transform, name):
    data = Images(transform=transform)
    assert random_augmentation(data) == name
    with pytest.raises(CacheError, match=f"{name}.*cache_augmented_views=True"):
        FeatureCache(tmp_path).dataset(side_model(), data, batch_size=5)
    assert entries(tmp_path) == []  # refused before anything is written


def test_augmented_flag_and_opt_in_caches_fixed_views(tmp_path):
    flagged = Images()
    flagged.augmented = True
    with pytest.raises(CacheError, match="augmented=True"):
        FeatureCache(tmp_path).dataset(side_model(), flagged, batch_size=5)

    data = Images(transform=transforms.RandomHorizontalFlip())
    model, cache = side_model(), FeatureCache(tmp_path)
    first = cache.dataset(model, data, batch_size=5, cache_augmented_views=True)
    second = cache.dataset(model, data, batch_size=5, cache_augmented_views=True)
    assert cache.builds == 1 and first.key == second.key  # the seeded views hash the same every run
    views = torch.stack([first[i][0].pooled for i in range(10)])
    plain = Images()
    with torch.no_grad():
        unflipped = model.backbone.intermediates(plain.x, layers=[0, 1]).pooled
        flipped = model.backbone.intermediates(plain.x.flip(-1), layers=[0, 1]).pooled
    each = [torch.allclose(v, a, atol=1e-5) or torch.allclose(v, b, atol=1e-5) for v, a, b in zip(views, unflipped, flipped)]
    assert all(each)
    assert cache.dataset(model, data, batch_size=5, cache_augmented_views=True, view_seed=1).key != first.key


def test_linear_probe_can_cache_but_in_backbone_tuners_cannot(tmp_path):
    probe = utuning.tune(CountingViT(tiny_vit()), [("linear_probe", "head", {"num_classes": 3})])
    cached = FeatureCache(tmp_path).dataset(probe, Images(), batch_size=5)
    feats, _ = cached.collate([cached[0], cached[1]])
    assert feats.layers == {} and feats.pooled.shape == (2, 32)
    lora = utuning.tune(CountingViT(tiny_vit()), [("lora", "blocks.*.attn.qkv", {})])
    with pytest.raises(CacheError, match="inside the backbone"):
        FeatureCache(tmp_path).dataset(lora, Images(), batch_size=5)


class Sentences(Dataset):
    """Token sequences of different lengths with per-token labels (dict items)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(1, 50, (n,), generator=g) for n in (3, 6, 4, 2, 5)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        ids = self.items[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": ids % 4}


def pad_batch(items):
    n = max(len(it["input_ids"]) for it in items)

    def pad(key, fill):
        return torch.stack([F.pad(it[key], (0, n - len(it[key])), value=fill) for it in items])

    return {"input_ids": pad("input_ids", 0), "attention_mask": pad("attention_mask", False), "labels": pad("labels", -100)}


def test_text_features_of_different_lengths(tmp_path):
    torch.manual_seed(0)
    model = utuning.tune(StubText(), [("ytuning", "blocks.*", {"task": "labelling", "num_labels": 4})]).eval()
    data = Sentences()
    cached = FeatureCache(tmp_path, shard_size=3).dataset(model, data, batch_size=2, collate_fn=pad_batch)
    feats, labels = cached.collate([cached[i] for i in (4, 1, 3)])
    live = pad_batch([data[i] for i in (4, 1, 3)])
    assert feats.layers[0].shape == (3, 6, 16) and torch.equal(feats.mask, live["attention_mask"])
    assert torch.equal(labels, live["labels"])  # per-token targets padded with -100
    with torch.no_grad():
        expected = model(input_ids=live["input_ids"], attention_mask=live["attention_mask"])
        got = model.side_forward(feats)
    torch.testing.assert_close(got[feats.mask], expected[feats.mask], atol=1e-5, rtol=1e-5)


class FileData(Images):
    """Images whose fingerprint is the identity of a data file (as ``utuning.data`` datasets)."""

    def __init__(self, path) -> None:
        super().__init__()
        self.path = path

    def fingerprint(self) -> str:
        return json.dumps(file_identity([self.path]))


def test_an_edit_with_the_mtime_restored_gives_a_new_entry(tmp_path):
    """Same size, mtime put back (as ``cp -p`` / ``rsync -a`` / ``tar`` do): the bytes decide."""
    data_file = tmp_path / "train.jsonl"
    data_file.write_text('{"text": "good", "label": 1}\n')
    model, cache = side_model(), FeatureCache(tmp_path / "cache")
    first = cache.dataset(model, FileData(data_file))
    st = data_file.stat()
    data_file.write_text('{"text": "bad!", "label": 0}\n')  # same size
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data_file.stat().st_size == st.st_size and data_file.stat().st_mtime_ns == st.st_mtime_ns
    second = cache.dataset(model, FileData(data_file))
    assert second.key != first.key and cache.builds == 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_halves_the_disk_and_keeps_the_features(tmp_path, dtype):
    model, data = side_model(), Images()
    full = FeatureCache(tmp_path / "f32").dataset(model, data)
    half = FeatureCache(tmp_path / "half", dtype=dtype).dataset(model, data)
    size = {n: sum(f.stat().st_size for f in (tmp_path / n / c.key).glob("shard-*")) for n, c in
            (("f32", full), ("half", half))}
    assert size["half"] < 0.55 * size["f32"]
    (a, ya), (b, yb) = (c.collate([c[i] for i in range(10)]) for c in (full, half))
    assert b.layers[1].dtype == torch.float32 and torch.equal(ya, yb)  # batches are float32, targets exact
    tol = 1e-2 if dtype == "float16" else 4e-2
    torch.testing.assert_close(b.layers[1], a.layers[1], rtol=tol, atol=tol)
    model.train()
    F.cross_entropy(model(features=b), yb).backward()  # a side tuner trains on them


def test_cache_dtype_names_are_checked_and_float16_overflow_is_refused(tmp_path):
    with pytest.raises(CacheError, match=r"cache_dtype='fp16'.*did you mean \['float16'"):
        FeatureCache(tmp_path, dtype="fp16")
    loud = Images()
    loud.x *= 1e6  # the tiny ViT's block outputs then exceed 65504
    with pytest.raises(CacheError, match="beyond torch.float16's range; store them as bfloat16"):
        FeatureCache(tmp_path, dtype="float16").dataset(side_model(), loud)
    assert FeatureCache(tmp_path, dtype="bfloat16").dataset(side_model(), loud).key


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_reading_the_cache_maps_no_shard_into_memory(tmp_path):
    """Rows are read with pread: no shard is memory-mapped, so resident memory does not grow
    with the part of the cache an epoch has touched."""
    cached = FeatureCache(tmp_path, shard_size=4).dataset(side_model(), Images())
    for feats, _ in DataLoader(cached, batch_size=3, collate_fn=cached.collate):
        assert feats.layers[0].shape[1:] == (17, 32)
        maps = open("/proc/self/maps").read()
        assert "shard-" not in maps


def test_shards_are_bounded_in_bytes(tmp_path):
    """``shard_mib`` caps a shard's size (building holds about two shards), whatever shard_size says."""
    cached = FeatureCache(tmp_path, shard_mib=0.015).dataset(side_model(), Images())  # ~2 samples of 6.7 KB
    shards = sorted((tmp_path / cached.key).glob("shard-*"))
    assert len(shards) == 5 and max(f.stat().st_size for f in shards) < 0.015 * 2**20 + 4096
    feats, _ = cached.collate([cached[i] for i in range(10)])
    assert feats.layers[1].shape == (10, 17, 32)


def test_the_head_is_not_part_of_the_key_but_a_block_is(tmp_path):
    """A new head is random per seed: seeds must share one entry; any block weight must not."""
    model, data = side_model(), Images()
    cache = FeatureCache(tmp_path)
    first = cache.dataset(model, data)
    with torch.no_grad():
        model.backbone.model.head.weight.add_(1.0)
    assert cache.dataset(model, data).key == first.key and cache.builds == 1
    with torch.no_grad():
        model.backbone.model.blocks[0].mlp.fc1.weight.add_(1e-3)
    assert cache.dataset(model, data).key != first.key and cache.builds == 2
