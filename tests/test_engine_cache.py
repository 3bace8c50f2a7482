"""``train.cache_features`` in the engine: training from cached frozen features gives the same
losses and weights as training on live features (side tuner, linear probe, extractive QA on a
tiny BERT), a second run reuses the cache, resume works, and models or data that cannot be
cached are refused before anything is built."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from tests.test_engine import TinyImages, read_jsonl, tiny_recipe
from utuning.backbones.hf_text import TINY
from utuning.checkpoint import LAST, read_checkpoint, write_pointer
from utuning.engine import evaluate, train
from utuning.errors import ConfigError
from utuning.schema import (
    BackboneConfig,
    DataConfig,
    OptimConfig,
    OutputConfig,
    Recipe,
    TaskConfig,
    TrainConfig,
    TunerConfig,
)

YTUNING = [TunerConfig(name="ytuning", at="blocks.*", args={"num_labels": 4, "hidden": 16, "heads": 2})]
PROBE = [TunerConfig(name="linear_probe", at="head")]


class Images(TinyImages):
    """``TinyImages`` with the ``utuning.data`` fingerprint and an optional transform."""

    def __init__(self, n: int, *, seed: int, transform=None) -> None:
        super().__init__(n, seed=seed)
        self.seed, self.transform = seed, transform

    def fingerprint(self) -> str:
        return f"images:{len(self)}:{self.seed}"

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if self.transform is not None:
            item["inputs"]["pixel_values"] = self.transform(item["inputs"]["pixel_values"])
        return item


def images(transform=None) -> tuple[Images, Images]:
    return Images(32, seed=0, transform=transform), Images(16, seed=1)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]


def assert_same_run(a: Path, b: Path, sa: dict, sb: dict, tol: float = 1e-5, weights: bool = True) -> None:
    """Same per-step losses, final eval and (``weights``) final tuner weights."""
    assert losses(a) == pytest.approx(losses(b), rel=tol, abs=tol)
    assert sa["final_eval"] == pytest.approx(sb["final_eval"], rel=tol, abs=tol)
    if not weights:
        return
    wa, wb = read_checkpoint(a)[0], read_checkpoint(b)[0]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=tol, msg=k)


def entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()} if cache.exists() else set()


def test_side_tuner_from_cache_equals_live_features_and_reuses_the_cache(tmp_path):
    cache = tmp_path / "cache"
    live = train(tiny_recipe(tmp_path / "live", tuners=YTUNING), data=images())
    first = train(tiny_recipe(tmp_path / "first", tuners=YTUNING, cache_features=True, cache_dtype="float32", cache_dir=str(cache)),
                  data=images())
    assert first["feature_cache"]["built"] == 2 and entries(cache) == set(first["feature_cache"]["entries"])
    assert_same_run(tmp_path / "live", tmp_path / "first", live, first)

    second = train(tiny_recipe(tmp_path / "second", tuners=YTUNING, cache_features=True, cache_dtype="float32", cache_dir=str(cache)),
                   data=images())
    assert second["feature_cache"]["built"] == 0  # both splits read from disk, the backbone never ran
    assert second["feature_cache"]["entries"] == first["feature_cache"]["entries"]
    assert entries(cache) == set(first["feature_cache"]["entries"])
    assert_same_run(tmp_path / "first", tmp_path / "second", first, second, tol=0)
    recipe = tiny_recipe(tmp_path / "second", tuners=YTUNING, cache_features=True, cache_dtype="float32", cache_dir=str(cache))
    assert evaluate(recipe, tmp_path / "second", data=images()[1]) == pytest.approx(second["final_eval"], abs=1e-6)


def test_linear_probe_from_cache_equals_live_features(tmp_path):
    live = train(tiny_recipe(tmp_path / "live", tuners=PROBE), data=images())
    cached = train(tiny_recipe(tmp_path / "cached", tuners=PROBE, cache_features=True, cache_dtype="float32",
                               cache_dir=str(tmp_path / "cache")), data=images())
    assert cached["feature_cache"]["built"] == 2
    assert_same_run(tmp_path / "live", tmp_path / "cached", live, cached)


def test_resume_from_cached_features_matches_an_uninterrupted_run(tmp_path):
    def recipe(out: Path, **train_args) -> Recipe:
        r = tiny_recipe(out, tuners=YTUNING, cache_features=True, cache_dtype="float32", cache_dir=str(tmp_path / "cache"),
                        checkpoint_every=2, **train_args)
        r.schedule.name = "none"  # the stopped run is shorter; a schedule would give it other rates
        return r

    reference = train(recipe(tmp_path / "clean", epochs=3), data=images())
    stopped = train(recipe(tmp_path / "resumed", steps=8), data=images())
    assert stopped["feature_cache"]["built"] == 0
    # As if killed after the mid-epoch checkpoint of update 6 (epoch 2, batch 2 of 4).
    checkpoints = tmp_path / "resumed" / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000008")
    write_pointer(checkpoints, LAST, "step_00000006")
    resumed = train(recipe(tmp_path / "resumed", epochs=3), resume=True, data=images())
    assert resumed["steps"] == reference["steps"] == 12
    assert_same_run(tmp_path / "resumed", tmp_path / "clean", resumed, reference, tol=1e-6)


DDP_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_engine import tiny_recipe
from tests.test_engine_cache import PROBE, images
from utuning.engine import train

train(tiny_recipe({out!r}, tuners=PROBE, epochs=1, batch_size=8, cache_features=True, cache_dtype="float32", cache_dir={cache!r}), data=images())
"""


def test_two_process_ddp_from_cached_features_matches_one_process(tmp_path):
    """Cached batches go through the DDP-wrapped model, so gradients are averaged over processes."""
    script, cache = tmp_path / "run.py", str(tmp_path / "cache")
    script.write_text(DDP_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1]), out=str(tmp_path / "ddp"),
                                        cache=cache))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp["num_processes"] == 2 and ddp["feature_cache"]["built"] == 2  # the main process built both
    single = train(tiny_recipe(tmp_path / "single", tuners=PROBE, epochs=1, batch_size=8, cache_features=True, cache_dtype="float32",
                               cache_dir=cache), data=images())
    assert single["feature_cache"]["built"] == 0
    assert_same_run(tmp_path / "ddp", tmp_path / "single", ddp, single)


def test_tuners_inside_the_backbone_are_refused(tmp_path):
    lora = [TunerConfig(name="lora", at="blocks.*.attn.qkv", args={"rank": 2}), *PROBE]
    recipe = tiny_recipe(tmp_path / "run", tuners=lora, cache_features=True, cache_dtype="float32", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"train\.cache_features.*blocks\.0\.attn\.qkv\.lora"):
        train(recipe, data=images())
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_random_augmentation_needs_cache_augmented_views(tmp_path):
    flip = transforms.RandomHorizontalFlip()
    recipe = tiny_recipe(tmp_path / "run", tuners=PROBE, epochs=1, cache_features=True, cache_dtype="float32",
                         cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"RandomHorizontalFlip.*train\.cache_augmented_views: true"):
        train(recipe, data=images(flip))
    assert not (tmp_path / "cache").exists()
    recipe.train.cache_augmented_views = True
    assert train(recipe, data=images(flip))["feature_cache"]["built"] == 2


# Extractive QA: ytuning task="span" on a tiny BERT ------------------------------------------------
class TinyQA(Dataset):
    """Sequences of 6-12 tokens (ids 10..99 after a first token 2) whose answer runs from the
    token 5 to the token 6, both included; labels (2,) long [start, end]."""

    task = "qa"
    num_classes = 2
    metrics = ["qa_exact", "qa_f1"]
    label_names = None

    def __init__(self, n: int, *, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.seed, self.items = seed, []
        for _ in range(n):
            length = int(torch.randint(6, 13, (), generator=g))
            ids = torch.randint(10, 100, (length,), generator=g)
            ids[0] = 2  # a [CLS]-like first token
            start = int(torch.randint(1, length - 1, (), generator=g))  # 1 .. length - 2
            end = int(torch.randint(start + 1, length, (), generator=g))  # start + 1 .. length - 1
            ids[start], ids[end] = 5, 6
            self.items.append({
                "inputs": {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                           "token_type_ids": torch.zeros(length, dtype=torch.long)},
                "labels": torch.tensor([start, end]),
            })

    def fingerprint(self) -> str:
        return f"tiny-qa:{len(self)}:{self.seed}"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def qa_recipe(out: Path, **train_args) -> Recipe:
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return Recipe(
        name="tiny-qa",
        backbone=BackboneConfig(name="hf_text", model="bert", args={**TINY, **no_dropout, "tokenizer": False}),
        tuners=[TunerConfig(name="ytuning", at="blocks.*",
                            args={"task": "span", "hidden": 16, "heads": 2, "dropout": 0.0})],
        task=TaskConfig(type="qa"),
        data=DataConfig(name="tiny"),
        optim=OptimConfig(name="adamw", lr=1e-2, weight_decay=0.0),
        train=TrainConfig(**{"epochs": 4, "batch_size": 8, "log_every": 1, **train_args}),
        output=OutputConfig(dir=str(out), tensorboard=False),
    )


def test_ytuning_span_qa_trains_and_evaluates_live_and_cached(tmp_path):
    data = (TinyQA(32, seed=0), TinyQA(16, seed=1))
    live = train(qa_recipe(tmp_path / "live"), data=data)
    steps = losses(tmp_path / "live")
    assert live["steps"] == 16 and sum(steps[-4:]) < 0.8 * sum(steps[:4])
    assert set(live["final_eval"]) == {"loss", "qa_exact", "qa_f1"}
    assert 0 <= live["final_eval"]["qa_exact"] <= live["final_eval"]["qa_f1"] <= 1
    # Cached text features are padded per shard, not per batch; the key padding mask hides that up
    # to rounding. Weights are not compared: biases whose span scores are shift-invariant over the
    # positions (key biases, the label bias) have zero true gradient, and Adam amplifies the rounding.
    cached = train(qa_recipe(tmp_path / "cached", cache_features=True, cache_dtype="float32", cache_dir=str(tmp_path / "cache")), data=data)
    assert cached["feature_cache"]["built"] == 2
    assert_same_run(tmp_path / "live", tmp_path / "cached", live, cached, tol=1e-5, weights=False)


def test_float16_cache_is_the_default_and_trains_like_float32(tmp_path):
    """``train.cache_dtype`` defaults to float16 (half the disk); a run from it ends within rounding of
    the float32 run, and each run's entry stores its own dtype."""
    runs = {}
    for dtype in ("float16", "float32"):
        recipe = tiny_recipe(tmp_path / dtype, tuners=YTUNING, cache_features=True, cache_dir=str(tmp_path / "cache"))
        if dtype == "float32":
            recipe.train.cache_dtype = "float32"
        assert recipe.train.cache_dtype == dtype
        runs[dtype] = train(recipe, data=images())
    assert set(runs["float16"]["feature_cache"]["entries"]).isdisjoint(runs["float32"]["feature_cache"]["entries"])
    assert runs["float16"]["final_eval"]["loss"] == pytest.approx(runs["float32"]["final_eval"]["loss"], abs=2e-2)
