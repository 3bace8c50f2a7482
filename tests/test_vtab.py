"""VTAB-1k: the loader on a tiny synthetic folder in NOAH's list layout, and the generated recipes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utuning import cli
from utuning.data import build_dataset
from utuning.data.vtab import GROUPS, VTAB_TASKS
from utuning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
VTAB = REPO / "recipes" / "vtab"
METHODS = ["full", "linear", "vpt_deep", "adapter", "adaptformer", "lora", "ssf", "u_tuning", "dual_u_tuner",
           "tri_u_tuner", "res_tuning_bypass", "ytuning"]


def write_task(root: Path, task: str, *, per_split: int = 4, size: int = 12) -> Path:
    """``root/task`` with ``per_split`` random RGB images per split and the four split lists."""
    folder = root / task
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(len(task))
    lines: dict[str, list[str]] = {}
    for split in ("train800", "val200", "test"):
        lines[split] = []
        for i in range(per_split):
            name = f"images/{split}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(folder / name)
            lines[split].append(f"{name} {i % VTAB_TASKS[task][0]}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def test_the_nineteen_tasks_and_their_groups() -> None:
    groups = [VTAB_TASKS[t][1] for t in VTAB_TASKS]
    assert len(VTAB_TASKS) == 19 and [groups.count(g) for g in GROUPS] == [7, 4, 8]
    assert VTAB_TASKS["cifar"][0] == 100 and VTAB_TASKS["sun397"][0] == 397 and VTAB_TASKS["smallnorb_ele"][0] == 9


def test_loader_reads_the_lists_with_the_no_augmentation_transform(tmp_path: Path) -> None:
    folder = write_task(tmp_path, "dtd")
    ds = build_dataset("vtab_dtd", split="train800val200", root=str(tmp_path), img_size=16)
    assert (len(ds), ds.num_classes, ds.task) == (8, 47, "classification")
    assert [int(ds[i]["labels"]) for i in range(len(ds))] == [0, 1, 2, 3, 0, 1, 2, 3]
    # NOAH's transform: square bicubic resize (no crop), ImageNet mean / std.
    image = Image.open(folder / "images" / "val200_1.png").convert("RGB").resize((16, 16), Image.BICUBIC)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255 - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(ds[5]["inputs"]["pixel_values"], expected, atol=0.02)
    again = build_dataset("vtab_dtd", split="train800val200", root=str(tmp_path), img_size=16)
    assert torch.equal(again[5]["inputs"]["pixel_values"], ds[5]["inputs"]["pixel_values"])  # deterministic
    own = build_dataset("vtab_dtd", split="test", root=str(folder), normalize="backbone", mean=[0.5] * 3,
                        std=[0.5] * 3)  # the task folder itself as root; explicit statistics win
    assert len(own) == 4 and own[0]["inputs"]["pixel_values"].shape == (3, 224, 224)
    assert own.fingerprint() != build_dataset("vtab_dtd", split="test", root=str(folder)).fingerprint()


def test_loader_errors_name_the_file_and_line(tmp_path: Path) -> None:
    folder = write_task(tmp_path, "kitti")
    with pytest.raises(ConfigError, match="train800val200"):
        build_dataset("vtab_kitti", split="trainval", root=str(tmp_path))
    with pytest.raises(ConfigError, match="needs `root`"):
        build_dataset("vtab_kitti", split="test")
    with pytest.raises(ConfigError, match="holds VTAB-1k split lists"):
        build_dataset("vtab_kitti", split="test", root=str(tmp_path / "nowhere"))
    (folder / "val200.txt").write_text("images/val200_0.png 1\nimages/val200_1.png one\n")
    with pytest.raises(ConfigError, match=r"val200.txt:2: expected 'relative/image/path label'"):
        build_dataset("vtab_kitti", split="val200", root=str(tmp_path))
    (folder / "val200.txt").write_text("images/val200_0.png 4\n")  # KITTI-Dist has 4 classes
    with pytest.raises(ConfigError, match=r"val200.txt:1: label 4 is outside 0..3"):
        build_dataset("vtab_kitti", split="val200", root=str(tmp_path))
    (folder / "images" / "test_2.png").unlink()
    with pytest.raises(ConfigError, match=r"test.txt:3: image .*test_2.png' not found"):
        build_dataset("vtab_kitti", split="test", root=str(tmp_path))


def _generator():
    spec = importlib.util.spec_from_file_location("generate_vtab", REPO / "recipes" / "generate_vtab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_are_generated_for_every_task_and_method() -> None:
    gen = _generator()
    assert gen.VTAB_METHODS == METHODS
    leaves = sorted(p.relative_to(VTAB).as_posix() for p in VTAB.glob("*/*.yaml") if p.parent.name != "base")
    assert leaves == sorted(f"{t}/{m}.yaml" for t in VTAB_TASKS for m in METHODS)
    stale = [p for p in leaves if (VTAB / p).read_text() != gen.leaf(*p[: -len(".yaml")].split("/"))]
    assert not stale, "run python recipes/generate_vtab.py"
    protocol = (VTAB / "base" / "protocol.yaml").read_text()
    assert protocol == gen.PROTOCOL and "train_split: train800val200" in protocol and "eval_split: test" in protocol


def test_every_recipe_passes_check_tiny(capsys) -> None:
    """All 228 recipes in one process: validation, the tiny model with the task's head, one forward."""
    paths = [str(VTAB / t / f"{m}.yaml") for t in VTAB_TASKS for m in METHODS]
    code = cli.main(["check", "--tiny", *paths])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.count("ok ") == len(paths) == 228
    # Linear probe of the tiny ViT (width 32): 32 x C + C tunable parameters for each task's C classes.
    for task, (classes, _, _) in VTAB_TASKS.items():
        assert f"vtab_{task}_linear, 1 tuners, {33 * classes:,} / " in out.out


def test_a_recipe_trains_on_the_synthetic_folder(tmp_path: Path, capsys) -> None:
    write_task(tmp_path / "data", "eurosat", per_split=6)
    out = tmp_path / "run"
    code = cli.main(["train", "--tiny", str(VTAB / "eurosat" / "linear.yaml"), f"data.root={tmp_path / 'data'}",
                     f"output.dir={out}", "train.epochs=1", "train.batch_size=4", "eval.every=1",
                     "train.precision='no'", "output.tensorboard=false", "schedule.warmup_epochs=0"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tunable_params"] == 33 * 10  # 12 train800val200 images, batch 4
    assert 0.0 <= summary["final_eval"]["accuracy"] <= 1.0
