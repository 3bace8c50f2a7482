import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models run fastest on one thread (2 threads were up to 30x slower on a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _register_tiny_images() -> None:
    """``tiny_images``: the synthetic 4-class 32x32 image set of tests/test_engine.py as a registered
    data set, so CLI tests train recipe files offline in seconds."""
    from utuning.data import DATASETS, register_dataset

    if "tiny_images" in DATASETS:
        return

    @register_dataset("tiny_images")
    def tiny_images(*, split: str, backbone=None, root=None, n: int = 32):
        from tests.test_engine import TinyImages

        return TinyImages(n if split == "train" else n // 2, seed=0 if split == "train" else 1)


_register_tiny_images()
