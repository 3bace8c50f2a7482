"""Write the leaf recipes of the zoo from the bases (run from the repository root:
``python recipes/generate_zoo.py``). The YAML files are committed; this script only saves typing."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent

VISION_DATA = ["cifar100", "cub200", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"]
VISION_METHODS = ["full", "linear", "bitfit", "vpt_shallow", "vpt_deep", "prefix", "adapter", "adaptformer", "lora",
                  "ssf", "u_tuning", "dual_u_tuner", "tri_u_tuner", "res_tuning_bypass", "ytuning"]
TEXT_MODELS = {"bert_base": "bert-base-uncased", "roberta_base": "roberta-base", "deberta_v3_base": "microsoft/deberta-v3-base"}
GLUE_TASKS = ["sst2", "mrpc", "cola", "qnli", "rte", "stsb"]
TEXT_METHODS = ["full", "linear", "bitfit", "prefix", "adapter", "lora", "ytuning"]
# DeBERTa's disentangled attention has no plain keys/values to prepend a prefix to (backbones/hf_text.py).
UNSUPPORTED = {("deberta_v3_base", "prefix")}


def leaf(path: Path, name: str, description: str, defaults: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"name: {name}", f"description: >-\n  {description}", "defaults:"] + [f"  - {d}" for d in defaults]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    for data in VISION_DATA:
        for method in VISION_METHODS:
            leaf(ROOT / "vision" / data / f"{method}.yaml", f"vit_b16_in21k_{data}_{method}",
                 f"ViT-B/16 (ImageNet-21k) on {data} with {method}; hyperparameters and their sources in "
                 f"recipes/base/methods/{method}.yaml.",
                 ["../../base/vit_b16_in21k.yaml", f"../../base/data/{data}.yaml", f"../../base/methods/{method}.yaml"])
    for model, hub in TEXT_MODELS.items():
        for task in GLUE_TASKS:
            for method in TEXT_METHODS:
                if (model, method) in UNSUPPORTED:
                    continue
                leaf(ROOT / "glue" / model / task / f"{method}.yaml", f"{model}_glue_{task}_{method}",
                     f"{hub} on GLUE {task} with {method}; hyperparameters and their sources in "
                     f"recipes/base/methods/text/{method}.yaml.",
                     [f"../../../base/text/{model}.yaml", f"../../../base/data/glue_{task}.yaml",
                      f"../../../base/methods/text/{method}.yaml"])


if __name__ == "__main__":
    main()
