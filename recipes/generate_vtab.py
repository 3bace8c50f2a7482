"""Write the VTAB-1k recipes (run from the repository root: ``python recipes/generate_vtab.py``).

One leaf per task and method, ``recipes/vtab/<task>/<method>.yaml``: the ViT-B/16 IN-21k base,
the VTAB-1k protocol (``recipes/vtab/base/protocol.yaml``), the method's base recipe (the same
one the CIFAR-100 / FGVC zoo uses) and the task's dataset and class count. The YAML files are
committed; this script only saves typing. Task names, class counts and groups come from
``utuning.data.vtab.VTAB_TASKS``, their one definition.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from utuning.data.vtab import DATASET_PREFIX, VTAB_TASKS  # noqa: E402

VTAB_METHODS = ["full", "linear", "vpt_deep", "adapter", "adaptformer", "lora", "ssf", "u_tuning", "dual_u_tuner",
                "tri_u_tuner", "res_tuning_bypass", "ytuning"]

PROTOCOL = """\
# The VTAB-1k protocol of NOAH (Zhang et al. 2022, arXiv 2206.04673) that U-Tuning (arXiv 2303.00690)
# and Res-Tuning (arXiv 2310.19859) follow: train on train800val200 (1,000 images), report on test;
# AdamW (the method's base recipe sets the optimizer, lr and weight decay), batch 64, 100 epochs,
# cosine with 10 warm-up epochs (from ../../base/vit_b16_in21k.yaml); no augmentation: a square
# 224x224 bicubic resize and ImageNet normalisation (utuning.data.vtab). Hyperparameters are
# chosen on the val200 split after training on train800: `utuning sweep` (docs/research.md) runs
# that selection with data.train_split=train800 data.eval_split=val200.
# data.root: the vtab-1k folder holding the 19 task folders (set it, e.g. data.root=/data/vtab-1k).
data:
  root: null
  train_split: train800val200
  eval_split: test
eval:
  every: 10
"""


def leaf(task: str, method: str) -> str:
    num_classes, group, title = VTAB_TASKS[task]
    return "\n".join([
        f"name: vit_b16_in21k_vtab_{task}_{method}",
        "description: >-",
        f"  ViT-B/16 (ImageNet-21k) on VTAB-1k {title} ({group}, {num_classes} classes) with {method}; "
        f"hyperparameters and their sources in recipes/base/methods/{method}.yaml, the protocol in "
        "recipes/vtab/base/protocol.yaml.",
        "defaults:",
        "  - ../../base/vit_b16_in21k.yaml",
        "  - ../base/protocol.yaml",
        f"  - ../../base/methods/{method}.yaml",
        "backbone:",
        f"  num_classes: {num_classes}",
        "data:",
        f"  name: {DATASET_PREFIX}{task}",
    ]) + "\n"


def main() -> None:
    (ROOT / "vtab" / "base").mkdir(parents=True, exist_ok=True)
    (ROOT / "vtab" / "base" / "protocol.yaml").write_text(PROTOCOL)
    for task in VTAB_TASKS:
        (ROOT / "vtab" / task).mkdir(parents=True, exist_ok=True)
        for method in VTAB_METHODS:
            (ROOT / "vtab" / task / f"{method}.yaml").write_text(leaf(task, method))


if __name__ == "__main__":
    main()
