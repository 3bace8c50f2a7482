"""VTAB-1k (Zhai et al. 2019, arXiv 1910.04867) in the file layout the PETL literature distributes.

NOAH (Zhang et al. 2022, arXiv 2206.04673, github.com/ZhangYuanhan-AI/NOAH) published the 1,000-image
training sets of the 19 tasks as image folders with plain-text split lists; VPT's successors,
U-Tuning (arXiv 2303.00690) and Res-Tuning (arXiv 2310.19859) all report on that copy::

    <root>/<task>/train800.txt, val200.txt, train800val200.txt, test.txt
    <root>/<task>/<any image folder>/...            one line per image: "relative/path label"

``root`` is the folder holding the 19 task folders (NOAH's ``data/vtab-1k``), or one task's own
folder. Paths in the lists are relative to the task folder. The protocol: choose hyperparameters
training on ``train800`` and evaluating on ``val200``, then train on ``train800val200`` and
report ``test``. No augmentation: ``Resize((224, 224), bicubic) -> ToTensor -> Normalize`` with
the ImageNet statistics as NOAH's loader (``normalize="imagenet"``), or the backbone's own
(``normalize="backbone"``); explicit ``mean``/``std``/``img_size`` win.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from utuning.data.base import choose, register_dataset
from utuning.data.fgvc import FileImages
from utuning.data.vision import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, data_config
from utuning.errors import ConfigError

NATURAL, SPECIALIZED, STRUCTURED = "Natural", "Specialized", "Structured"
GROUPS = (NATURAL, SPECIALIZED, STRUCTURED)
# task folder -> (number of classes, group, name in paper tables); the order of the papers' tables.
VTAB_TASKS: dict[str, tuple[int, str, str]] = {
    "cifar": (100, NATURAL, "CIFAR-100"),
    "caltech101": (102, NATURAL, "Caltech101"),
    "dtd": (47, NATURAL, "DTD"),
    "oxford_flowers102": (102, NATURAL, "Flowers102"),
    "oxford_iiit_pet": (37, NATURAL, "Pets"),
    "svhn": (10, NATURAL, "SVHN"),
    "sun397": (397, NATURAL, "Sun397"),
    "patch_camelyon": (2, SPECIALIZED, "Camelyon"),
    "eurosat": (10, SPECIALIZED, "EuroSAT"),
    "resisc45": (45, SPECIALIZED, "Resisc45"),
    "diabetic_retinopathy": (5, SPECIALIZED, "Retinopathy"),
    "clevr_count": (8, STRUCTURED, "Clevr-Count"),
    "clevr_dist": (6, STRUCTURED, "Clevr-Dist"),
    "dmlab": (6, STRUCTURED, "DMLab"),
    "kitti": (4, STRUCTURED, "KITTI-Dist"),
    "dsprites_loc": (16, STRUCTURED, "dSpr-Loc"),
    "dsprites_ori": (16, STRUCTURED, "dSpr-Ori"),
    "smallnorb_azi": (18, STRUCTURED, "sNORB-Azim"),
    "smallnorb_ele": (9, STRUCTURED, "sNORB-Elev"),
}
SPLITS = ("train800", "val200", "train800val200", "test")
DATASET_PREFIX = "vtab_"  # registered names: vtab_cifar, vtab_dtd, ...


def vtab_transform(*, backbone: Any = None, normalize: str = "imagenet", img_size: int | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Callable:
    """NOAH's VTAB transform: a square bicubic resize (no crop, no augmentation) and normalisation."""
    from torchvision import transforms as T

    choose("normalize", normalize, ("imagenet", "backbone"))
    cfg = data_config(backbone)
    size = int(img_size or cfg.get("img_size", 224))
    stats = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else (cfg.get("mean", IMAGENET_MEAN),
                                                                           cfg.get("std", IMAGENET_STD))
    norm = T.Normalize(tuple(mean or stats[0]), tuple(std or stats[1]))
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), norm])


def task_folder(root: Any, task: str) -> Path:
    """The folder holding ``task``'s split lists: ``root/task`` or ``root`` itself."""
    if root is None:
        raise ConfigError(f"Dataset '{DATASET_PREFIX}{task}' needs `root`: the vtab-1k folder holding <task>/"
                          "{train800,val200,train800val200,test}.txt and the images")
    root = Path(root).expanduser()
    for folder in (root / task, root):
        if (folder / "test.txt").is_file() or (folder / "train800val200.txt").is_file():
            return folder
    raise ConfigError(f"Dataset '{DATASET_PREFIX}{task}': neither {str(root / task)!r} nor {str(root)!r} holds "
                      "VTAB-1k split lists (train800.txt, val200.txt, train800val200.txt, test.txt)")


def read_list(path: Path, num_classes: int) -> tuple[list[Path], list[int]]:
    """Image files and labels of one split list; a bad line or a missing image names file and line."""
    if not path.is_file():
        raise ConfigError(f"VTAB-1k split list {str(path)!r} not found")
    files, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ConfigError(f"{path}:{number}: expected 'relative/image/path label', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise ConfigError(f"{path}:{number}: label {label} is outside 0..{num_classes - 1} for this task")
        image = path.parent / parts[0]
        if not image.is_file():
            raise ConfigError(f"{path}:{number}: image {str(image)!r} not found")
        files.append(image)
        labels.append(label)
    if not files:
        raise ConfigError(f"VTAB-1k split list {str(path)!r} is empty")
    return files, labels


def vtab_dataset(task: str, *, split: str, backbone: Any = None, root: Any = None, normalize: str = "imagenet",
                 subset: int | None = None, subset_mode: str = "first", img_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImageDataset:
    """One VTAB-1k task; ``split`` one of train800, val200, train800val200, test."""
    choose("split", split, SPLITS)
    num_classes, _, title = VTAB_TASKS[task]
    folder = task_folder(root, task)
    files, labels = read_list(folder / f"{split}.txt", num_classes)
    tf = {"img_size": img_size, "mean": mean, "std": std}
    return ImageDataset(
        load=FileImages(files), targets=labels, name=f"{DATASET_PREFIX}{task}", split=split,
        num_classes=num_classes, label_names=[str(c) for c in range(num_classes)],
        transform=vtab_transform(backbone=backbone, normalize=normalize, **tf),
        files=[folder / f"{split}.txt"], identity={**tf, "normalize": normalize, "task": title},
        subset=subset, subset_mode=subset_mode,
    )


def _register(task: str) -> None:
    num_classes, group, title = VTAB_TASKS[task]

    def build(*, split: str, backbone: Any = None, root: str | None = None, normalize: str = "imagenet",
              subset: int | None = None, subset_mode: str = "first", img_size: int | None = None,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImageDataset:
        return vtab_dataset(task, split=split, backbone=backbone, root=root, normalize=normalize, subset=subset,
                            subset_mode=subset_mode, img_size=img_size, mean=mean, std=std)

    build.__name__ = f"{DATASET_PREFIX}{task}"
    build.__doc__ = (f"VTAB-1k {title} ({group}, {num_classes} classes) in NOAH's list layout; splits "
                     f"{', '.join(SPLITS)}.")
    register_dataset(f"{DATASET_PREFIX}{task}")(build)


for _task in VTAB_TASKS:
    _register(_task)
