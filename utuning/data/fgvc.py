"""The five fine-grained (FGVC) sets of VPT (Jia et al. 2022, arXiv 2203.12119) in VPT's
JSON-split layout (``src/data/datasets/json_dataset.py`` of github.com/KMnP/vpt)::

    <root>/train.json, val.json, test.json     {"relative/image/path.jpg": class_id, ...}
    <root>/<image folder>/relative/image/path.jpg

Class ids are mapped to 0..C-1 in sorted order of the ids in ``train.json`` (VPT sorts each
split's own ids, which agrees whenever every split holds every class).
The image folder is VPT's for each set (CUB and NABirds ``images``, Stanford Dogs ``Images``,
Oxford Flowers and Stanford Cars the root itself); ``image_dir`` overrides it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from utuning.data.base import choose, register_dataset
from utuning.data.vision import VPT_CROP_PCT, ImageDataset, vision_transform
from utuning.errors import ConfigError

# name -> (image folder relative to root, number of classes, paper name)
FGVC_SETS = {
    "cub200": ("images", 200, "CUB-200-2011"),
    "nabirds": ("images", 555, "NABirds"),
    "oxford_flowers": ("", 102, "Oxford Flowers"),
    "stanford_dogs": ("Images", 120, "Stanford Dogs"),
    "stanford_cars": ("", 196, "Stanford Cars"),
}
SPLITS = ("train", "val", "test", "trainval")


class FileImages:
    """Picklable ``j -> PIL image`` over a list of image files."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __call__(self, j: int) -> Image.Image:
        with Image.open(self.files[j]) as image:
            return image.convert("RGB")


def _read_split(root: Path, split: str, name: str) -> dict[str, int]:
    path = root / f"{split}.json"
    if not path.is_file():
        raise ConfigError(
            f"Dataset {name!r}: split file {str(path)!r} not found. Expected VPT's layout: <root>/{{train,val,test}}.json "
            "mapping image paths (relative to the image folder) to class ids"
        )
    with open(path) as f:
        anno = json.load(f)
    if not isinstance(anno, dict) or not anno:
        raise ConfigError(f"Dataset {name!r}: {str(path)!r} must be a non-empty JSON object {{image path: class id}}")
    return anno


def fgvc_dataset(name: str, *, split: str, backbone: Any, root: Any, image_dir: str | None, augment: bool,
                 subset: int | None, subset_mode: str, **tf: Any) -> ImageDataset:
    choose("split", split, SPLITS)
    folder, num_classes, title = FGVC_SETS[name]
    if root is None:
        raise ConfigError(f"Dataset {name!r} ({title}) needs `root`: the folder with VPT's train/val/test.json splits")
    root = Path(root).expanduser()
    parts = ("train", "val") if split == "trainval" else (split,)
    anno: dict[str, int] = {}
    for part in parts:
        anno.update(_read_split(root, part, name))
    class_ids = sorted(set(_read_split(root, "train", name).values()))
    to_index = {c: i for i, c in enumerate(class_ids)}
    unknown = sorted(set(anno.values()) - set(to_index))
    if unknown:
        raise ConfigError(f"Dataset {name!r}: split {split!r} has class ids {unknown[:5]} that train.json lacks")
    images = root / (folder if image_dir is None else image_dir)
    files = [images / rel for rel in anno]
    missing = [str(f) for f in files[:1000] if not f.is_file()]
    if missing:
        raise ConfigError(f"Dataset {name!r}: image {missing[0]!r} (and {len(missing) - 1} more of the first 1000) "
                          f"not found; images are read from {str(images)!r} (set `image_dir` to change it)")
    transform = vision_transform(backbone=backbone, train=split in ("train", "trainval"), augment=augment, **tf)
    return ImageDataset(
        load=FileImages(files), targets=[to_index[c] for c in anno.values()], name=name, split=split,
        num_classes=len(class_ids), label_names=[str(c) for c in class_ids], transform=transform,
        files=[root / f"{p}.json" for p in parts], identity={**tf, "augment": augment, "image_dir": image_dir},
        subset=subset, subset_mode=subset_mode,
    )


def _register(name: str) -> None:
    title = FGVC_SETS[name][2]

    def build(*, split: str, backbone: Any = None, root: str | None = None, image_dir: str | None = None,
              augment: bool = True, subset: int | None = None, subset_mode: str = "first",
              img_size: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              crop_pct: float = VPT_CROP_PCT) -> ImageDataset:
        return fgvc_dataset(name, split=split, backbone=backbone, root=root, image_dir=image_dir, augment=augment,
                            subset=subset, subset_mode=subset_mode,
                            img_size=img_size, mean=mean, std=std, crop_pct=crop_pct)

    build.__name__ = name
    build.__doc__ = f"{title} in VPT's JSON-split layout; splits train, val, test, trainval."
    register_dataset(name)(build)


for _name in FGVC_SETS:
    _register(_name)
