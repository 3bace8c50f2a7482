"""Image classification sets: CIFAR-100, MNIST, Fashion-MNIST, MNIST-5k, ImageFolder, and
torchvision's Flowers102 and StanfordCars. Every loader reads local files; ``download=True``
(default False) lets torchvision fetch the public copy first.

Transforms follow VPT (Jia et al. 2022, arXiv 2203.12119): train ``Resize(s/0.875) ->
RandomCrop(s) -> RandomHorizontalFlip -> normalise``, test ``Resize(s/0.875) -> CenterCrop(s)``,
with size, mean and std from the backbone's timm data config. Greyscale images become 3 channels.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from utuning.data.base import ItemDataset, choose, register_dataset
from utuning.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VPT_CROP_PCT = 224 / 256


def data_config(backbone: Any) -> dict[str, Any]:
    """Input size, mean and std for ``backbone``, else {}.

    ``backbone`` is a built backbone wrapping a timm model (mean and std from timm's
    ``resolve_data_config`` of its ``pretrained_cfg``; the size from the backbone's own
    ``example_inputs``, because a model built with another ``img_size`` keeps its pretrained
    config's size), or a recipe's backbone section (``model`` a timm name, ``img_size``)."""
    from timm.data import resolve_data_config

    model = getattr(backbone, "model", None)
    if isinstance(model, str):  # a recipe's backbone section, not a built backbone
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(model)
        if pretrained is None:
            return {"img_size": backbone.img_size} if getattr(backbone, "img_size", None) else {}
        cfg = resolve_data_config(pretrained_cfg=pretrained.to_dict())
        size = getattr(backbone, "img_size", None) or int(cfg["input_size"][-1])
        return {"img_size": int(size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
    if model is None or getattr(model, "pretrained_cfg", None) is None:
        return {}
    cfg = resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    try:
        pixels = backbone.example_inputs(1).get("pixel_values")
        size = int(pixels.shape[-1]) if pixels is not None else size
    except (NotImplementedError, AttributeError, TypeError):
        pass
    return {"img_size": size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def vision_transform(*, backbone: Any = None, train: bool, augment: bool = True, img_size: int | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     crop_pct: float = VPT_CROP_PCT) -> Callable:
    """VPT's transforms. Explicit ``img_size``/``mean``/``std`` win over the backbone's config;
    without either: 224 and the ImageNet statistics."""
    from torchvision import transforms as T

    cfg = data_config(backbone)
    size = int(img_size or cfg.get("img_size", 224))
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct={crop_pct!r} must be in (0, 1]")
    resize = int(round(size / crop_pct))
    norm = T.Normalize(tuple(mean or cfg.get("mean", IMAGENET_MEAN)), tuple(std or cfg.get("std", IMAGENET_STD)))
    if train and augment:
        steps = [T.Resize(resize), T.RandomCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(resize), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), norm])


class ImageDataset(ItemDataset):
    """Images from ``load(j) -> PIL image`` and integer ``targets``; items ``{"pixel_values": (3, H, W)}``."""

    def __init__(self, *, load: Callable[[int], Image.Image], targets: Sequence[int], subset: int | None = None,
                 subset_mode: str = "first", **kwargs: Any) -> None:
        super().__init__(metrics=["accuracy"], **kwargs)
        self._load = load
        self.targets = [int(t) for t in targets]
        self.select(len(self.targets), targets=self.targets, subset=subset, subset_mode=subset_mode)

    def example(self, j: int) -> dict[str, Any]:
        image = self._load(j).convert("RGB")  # greyscale -> 3 channels
        pixels = self.transform(image)  # (3, H, W)
        return {"inputs": {"pixel_values": pixels}, "labels": torch.tensor(self.targets[j], dtype=torch.long)}


class ArrayImages:
    """Picklable ``j -> PIL image`` over a uint8 array (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __call__(self, j: int) -> Image.Image:
        return Image.fromarray(self.images[j])


class SourceImages:
    """Picklable ``j -> PIL image`` over a torchvision dataset built without a transform."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __call__(self, j: int) -> Image.Image:
        return self.source[j][0]


def array_dataset(*, images: np.ndarray, targets: Sequence[int], name: str, split: str, backbone: Any,
                  files: Sequence[Path], identity: dict, label_names: Sequence[str] | None, augment: bool,
                  subset: int | None, subset_mode: str, **tf: Any) -> ImageDataset:
    """An ``ImageDataset`` over a uint8 array (N, H, W) or (N, H, W, 3)."""
    transform = vision_transform(backbone=backbone, train=split == "train", augment=augment, **tf)
    return ImageDataset(
        load=ArrayImages(images), targets=targets, name=name, split=split,
        num_classes=len(label_names) if label_names else int(max(targets)) + 1, label_names=label_names,
        transform=transform, files=files, identity={**identity, **tf, "augment": augment},
        subset=subset, subset_mode=subset_mode,
    )


def _root(root: Any, name: str, layout: str) -> Path:
    if root is None:
        raise ConfigError(f"Dataset {name!r} needs `root`: {layout}")
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"Dataset {name!r}: root {str(path)!r} does not exist; expected {layout}")
    return path


# CIFAR-100 ------------------------------------------------------------------------------
CIFAR_LAYOUT = "a folder holding cifar-100-python/{train,test,meta} (the python pickle release)"


@register_dataset("cifar100")
def cifar100(*, split: str, backbone: Any = None, root: str | None = None, download: bool = False,
             augment: bool = True, subset: int | None = None, subset_mode: str = "first",
             img_size: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             crop_pct: float = VPT_CROP_PCT) -> ImageDataset:
    """CIFAR-100 (100 fine classes) from torchvision's pickle layout; splits train, test."""
    choose("split", split, ("train", "test"))
    if download and root is not None:
        from torchvision.datasets import CIFAR100

        CIFAR100(str(root), train=split == "train", download=True)
    base = _root(root, "cifar100", CIFAR_LAYOUT) / "cifar-100-python"
    batch = base / split
    if not batch.is_file():
        raise ConfigError(f"Dataset 'cifar100': {str(batch)!r} not found; expected {CIFAR_LAYOUT} "
                          "(or pass download=True)")
    entry = _read_cifar_pickle(batch)
    images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    names = None
    if (base / "meta").is_file():
        names = _read_cifar_pickle(base / "meta")["fine_label_names"]
    return array_dataset(images=images, targets=entry["fine_labels"], name="cifar100", split=split,
                         backbone=backbone, files=[batch], identity={}, label_names=names or [str(i) for i in range(100)],
                         augment=augment, subset=subset, subset_mode=subset_mode,
                         **_tf(img_size, mean, std, crop_pct))


class _DataOnlyUnpickler(pickle.Unpickler):
    """The CIFAR python release is a pickle by its authors' design. This unpickler rebuilds only
    plain data and numpy arrays: any other global (a function, a class) a tampered file names is
    refused, so reading the file can never run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the file is not plain CIFAR data")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _DataOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR python-release file ({e})") from None


def _tf(img_size, mean, std, crop_pct) -> dict[str, Any]:
    return {"img_size": img_size, "mean": mean, "std": std, "crop_pct": crop_pct}


# MNIST-like IDX sets --------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ConfigError(f"{str(path)!r} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(root: Path, folder: str, stem: str) -> Path | None:
    for base in (root, root / folder / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


def _mnist_like(name: str, folder: str, label_names: list[str], *, split: str, backbone: Any, root: Any,
                download: bool, augment: bool, subset: int | None, subset_mode: str, **tf: Any) -> ImageDataset:
    choose("split", split, ("train", "test"))
    layout = (f"a folder with the IDX files ({{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]) directly in it, "
              f"or torchvision's <root>/{folder}/raw/ layout")
    if download and root is not None:
        import torchvision.datasets as tvd

        getattr(tvd, folder)(str(root), train=split == "train", download=True)
    path = _root(root, name, layout)
    prefix = "train" if split == "train" else "t10k"
    found = [_idx_file(path, folder, f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
    if None in found:
        raise ConfigError(f"Dataset {name!r}: no {prefix} IDX files under {str(path)!r}; expected {layout} "
                          "(or pass download=True)")
    images, labels = read_idx(found[0]), read_idx(found[1])
    return array_dataset(images=images, targets=labels.astype(np.int64).tolist(), name=name, split=split,
                         backbone=backbone, files=found, identity={}, label_names=label_names, augment=augment,
                         subset=subset, subset_mode=subset_mode, **tf)


@register_dataset("mnist")
def mnist(*, split: str, backbone: Any = None, root: str | None = None, download: bool = False, augment: bool = True,
          subset: int | None = None, subset_mode: str = "first", img_size: int | None = None,
          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
          crop_pct: float = VPT_CROP_PCT) -> ImageDataset:
    """MNIST digits (torchvision's layout or a folder of the IDX .gz files); splits train, test."""
    return _mnist_like("mnist", "MNIST", [str(i) for i in range(10)], split=split, backbone=backbone, root=root,
                       download=download, augment=augment, subset=subset, subset_mode=subset_mode,
                       **_tf(img_size, mean, std, crop_pct))


@register_dataset("fashion_mnist")
def fashion_mnist(*, split: str, backbone: Any = None, root: str | None = None, download: bool = False,
                  augment: bool = True, subset: int | None = None, subset_mode: str = "first",
                  img_size: int | None = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, crop_pct: float = VPT_CROP_PCT) -> ImageDataset:
    """Fashion-MNIST (torchvision's layout or a folder of the IDX .gz files); splits train, test."""
    return _mnist_like("fashion_mnist", "FashionMNIST", FASHION_LABELS, split=split, backbone=backbone, root=root,
                       download=download, augment=augment, subset=subset, subset_mode=subset_mode,
                       **_tf(img_size, mean, std, crop_pct))


@register_dataset("mnist5k")
def mnist5k(*, split: str, backbone: Any = None, root: str | None = None, test_fraction: float = 0.2, seed: int = 0,
            augment: bool = True, subset: int | None = None, subset_mode: str = "first", img_size: int | None = None,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            crop_pct: float = VPT_CROP_PCT) -> ImageDataset:
    """5,000 MNIST digits from an npz (``images`` uint8 (N, 28, 28), ``labels``), split per class
    by a seeded permutation: ``test_fraction`` of each class is the test split."""
    choose("split", split, ("train", "test", "all"))
    layout = "the file mnist5k.npz (arrays `images` (N, 28, 28) uint8 and `labels`), or a folder holding it"
    path = _root(root, "mnist5k", layout)
    path = path / "mnist5k.npz" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"Dataset 'mnist5k': {str(path)!r} not found; expected {layout}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction!r} must be between 0 and 1")
    with np.load(path) as npz:
        images, labels = npz["images"], npz["labels"].astype(np.int64)
    keep = np.arange(len(labels)) if split == "all" else split_per_class(labels, test_fraction, seed, split)
    return array_dataset(images=images[keep], targets=labels[keep].tolist(), name="mnist5k", split=split,
                         backbone=backbone, files=[path], identity={"test_fraction": test_fraction, "seed": seed},
                         label_names=[str(i) for i in range(10)], augment=augment, subset=subset,
                         subset_mode=subset_mode, **_tf(img_size, mean, std, crop_pct))


def split_per_class(labels: Sequence[Any], test_fraction: float, seed: int, split: str) -> np.ndarray:
    """Sorted indices of a deterministic stratified train/test split."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(idx) * test_fraction))
        chosen.append(idx[:n_test] if split == "test" else idx[n_test:])
    return np.sort(np.concatenate(chosen))


# Generic folders and torchvision's fine-grained sets ------------------------------------
@register_dataset("image_folder")
def image_folder(*, split: str, backbone: Any = None, root: str | None = None, augment: bool = True,
                 subset: int | None = None, subset_mode: str = "first", img_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 crop_pct: float = VPT_CROP_PCT) -> ImageDataset:
    """torchvision ``ImageFolder``: ``<root>/<split>/<class>/<image>`` (classes sorted by name)."""
    from torchvision.datasets import ImageFolder

    layout = "<root>/<split>/<class name>/<image files>"
    folder = _root(root, "image_folder", layout) / split
    if not folder.is_dir():
        raise ConfigError(f"Dataset 'image_folder': split folder {str(folder)!r} not found; expected {layout}")
    source = ImageFolder(str(folder))
    return _from_torchvision(source, [t for _, t in source.samples], list(source.classes), "image_folder", split,
                             backbone, [folder], augment, subset, subset_mode, **_tf(img_size, mean, std, crop_pct))


def _from_torchvision(source, targets, label_names, name, split, backbone, files, augment, subset, subset_mode,
                      **tf) -> ImageDataset:
    transform = vision_transform(backbone=backbone, train=split == "train", augment=augment, **tf)
    return ImageDataset(load=SourceImages(source), targets=targets, name=name, split=split,
                        num_classes=len(label_names), label_names=label_names, transform=transform, files=files,
                        identity={**tf, "augment": augment}, subset=subset, subset_mode=subset_mode)


@register_dataset("flowers102")
def flowers102(*, split: str, backbone: Any = None, root: str | None = None, download: bool = False,
               augment: bool = True, subset: int | None = None, subset_mode: str = "first",
               img_size: int | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, crop_pct: float = VPT_CROP_PCT) -> ImageDataset:
    """torchvision ``Flowers102``: ``<root>/flowers-102/{jpg/,imagelabels.mat,setid.mat}``; splits train, val, test."""
    from torchvision.datasets import Flowers102

    choose("split", split, ("train", "val", "test"))
    layout = "<root>/flowers-102/ with jpg/, imagelabels.mat and setid.mat (torchvision's Flowers102 layout)"
    path = Path(root).expanduser() if root is not None else None
    if path is None or not (download or (path / "flowers-102" / "setid.mat").is_file()):
        raise ConfigError(f"Dataset 'flowers102': {str(path)!r} does not hold {layout}; or pass download=True")
    source = Flowers102(str(path), split=split, download=download)
    return _from_torchvision(source, list(source._labels), [str(i) for i in range(102)], "flowers102", split, backbone,
                             [path / "flowers-102" / "setid.mat"], augment, subset, subset_mode,
                             **_tf(img_size, mean, std, crop_pct))


@register_dataset("stanford_cars_torchvision")
def stanford_cars_torchvision(*, split: str, backbone: Any = None, root: str | None = None, augment: bool = True,
                              subset: int | None = None, subset_mode: str = "first", img_size: int | None = None,
                              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                              crop_pct: float = VPT_CROP_PCT) -> ImageDataset:
    """torchvision ``StanfordCars`` (needs scipy to read its .mat files): ``<root>/stanford_cars/``
    with devkit/, cars_train/, cars_test/ and cars_test_annos_withlabels.mat; splits train, test.
    The public download is gone, so there is no ``download`` option."""
    from torchvision.datasets import StanfordCars

    choose("split", split, ("train", "test"))
    layout = "<root>/stanford_cars/{devkit/,cars_train/,cars_test/,cars_test_annos_withlabels.mat}"
    path = Path(root).expanduser() if root is not None else None
    if path is None or not (path / "stanford_cars" / "devkit").is_dir():
        raise ConfigError(f"Dataset 'stanford_cars_torchvision': {str(path)!r} does not hold {layout}")
    source = StanfordCars(str(path), split=split)
    targets = [t for _, t in source._samples]
    return _from_torchvision(source, targets, list(source.classes), "stanford_cars_torchvision", split, backbone,
                             [path / "stanford_cars" / "devkit"], augment, subset, subset_mode,
                             **_tf(img_size, mean, std, crop_pct))
