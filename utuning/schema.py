"""The recipe schema: dataclasses that a YAML recipe is validated against (``utuning.recipe``).

A recipe is data; these dataclasses are its one definition. Unknown keys, wrong types and bad
values are errors naming the file, the key and the closest valid key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackboneConfig:
    name: str = "vit"  # a registered backbone (utuning.BACKBONES)
    model: str = "vit_base_patch16_224.orig_in21k"  # timm name, HF hub name, or local folder
    pretrained: Any = False  # False | True (hub weights) | path to a local checkpoint file or folder
    num_classes: int | None = None  # None: taken from the data
    img_size: int | None = None
    args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of Backbone.create
    # Overrides of the keys above that give a small offline model of the same family
    # (``utuning check --tiny``, tests); data, not code, so the core never branches on a name.
    tiny: dict[str, Any] = field(default_factory=dict)


@dataclass
class TunerConfig:
    name: str = "???"  # a registered tuner or composition
    at: Any = "???"  # site pattern or list of patterns
    args: dict[str, Any] = field(default_factory=dict)
    key: str | None = None  # output name of a side tuner when several share a backbone pass


@dataclass
class TaskConfig:
    type: str = "classification"  # classification | regression | labelling | qa
    label_smoothing: float = 0.0


@dataclass
class DataConfig:
    name: str = "???"  # a registered dataset (utuning.data.DATASETS)
    root: str | None = None  # local copy; loaders never need the network when it is given
    train_split: str = "train"
    eval_split: str = "test"
    # A fraction of train_split held out for validation (class-stratified, drawn with holdout_seed):
    # training reads the rest, and the split name "holdout" (e.g. eval_split: holdout) reads it.
    holdout: float | None = None
    holdout_seed: int = 0
    args: dict[str, Any] = field(default_factory=dict)  # dataset-specific (transforms, max_length, subset...)
    num_workers: int = 0


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm.optim.create_optimizer_v2 name
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: list[float] | None = None
    max_grad_norm: float | None = None


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # any timm.scheduler.create_scheduler_v2 name, or "none"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6


@dataclass
class TrainConfig:
    epochs: int = 1
    steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    grad_accum: int = 1
    precision: str = "no"  # no | fp16 | bf16 (accelerate mixed precision)
    seed: int = 0
    grad_checkpointing: bool = False
    compile: bool = False
    ema: float | None = None  # EMA decay of tuner weights, e.g. 0.999
    cache_features: bool = False  # side tuners / linear probe: reuse frozen features across epochs
    cache_augmented_views: bool = False
    cache_dir: str = ".cache/utuning/features"  # where cached frozen features live (shared across runs)
    cache_dtype: str = "float16"  # storage of cached features: float16 (half the disk; same predictions), bfloat16, float32
    log_every: int = 10
    checkpoint_every: int | None = None  # steps; None: every epoch
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run at once, or "skip" the update
    max_nonfinite: int = 5  # with nonfinite: skip, stop after this many skipped updates in a row


@dataclass
class EvalConfig:
    batch_size: int = 64
    every: int = 1  # epochs
    metrics: list[str] | None = None  # None: the dataset's own metrics


@dataclass
class OutputConfig:
    dir: str = "runs/${name}"
    tensorboard: bool = True  # <dir>/tb, beside metrics.jsonl
    trackers: list[str] = field(default_factory=list)  # accelerate trackers: mlflow, wandb, aim, tensorboard...
    tracker_args: dict[str, Any] = field(default_factory=dict)  # per tracker: its init arguments
    tracking_uri: str | None = None  # MLflow and the like: where runs are recorded (default: local sqlite:///mlflow.db)


@dataclass
class Recipe:
    name: str = "run"
    description: str = ""
    defaults: list[str] = field(default_factory=list)  # base recipes this one extends (paths relative to it)
    imports: list[str] = field(default_factory=list)  # plugins: module names or .py files (relative to the recipe)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tuners: list[TunerConfig] = field(default_factory=list)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
