"""The configurations the speed/memory benchmark measures, and how each one is built.

A *job* is a plain dict (it crosses a process boundary as JSON)::

    {"family": "vit" | "text", "model": timm name or "bert-base", "method": key of VIT_METHODS /
     TEXT_METHODS, "mode": "train" | "infer", "batch": 32, "img": 224, "seq": 128, "depth": None,
     "classes": 10, "tasks": 1, "warmup": 2, "iters": 5, "threads": 2}

``build(job)`` returns a ``Built``: the model, the inputs of one step and the parameters an
optimiser trains. Every model has random weights (fp32); nothing is downloaded.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Pending(Exception):
    """A configuration that cannot be measured yet (a part of utuning it needs is missing)."""


class Unavailable(Exception):
    """A reference configuration the installed reference library cannot run (e.g. PEFT's prefix
    tuning on a transformers release it does not support): reported as skipped, with the reason."""


@dataclass
class Built:
    model: nn.Module
    args: tuple = ()
    kwargs: dict[str, Tensor] = field(default_factory=dict)
    labels: Tensor | None = None
    trainable: list[nn.Parameter] = field(default_factory=list)
    total: int = 0
    note: str = ""

    def forward(self) -> Any:
        return self.model(*self.args, **self.kwargs)

    def loss(self, out: Any) -> Tensor:
        if hasattr(out, "logits"):
            out = out.logits
        outs = out.values() if isinstance(out, dict) else [out]
        return sum(F.cross_entropy(o.float(), self.labels) for o in outs)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ViT ----------------------------------------------------------------------------------------
def _timm(job: dict) -> nn.Module:
    import timm

    kwargs = {"img_size": job["img"], "num_classes": job["classes"]}
    if job.get("depth"):
        kwargs["depth"] = job["depth"]
    return timm.create_model(job["model"], pretrained=False, **kwargs)


def _head(job: dict) -> tuple:
    return ("linear_probe", "head", {"num_classes": job["classes"]})


def _side(name: str, job: dict, key: str | None = None, *, at: str = "blocks.*", args: dict | None = None) -> dict:
    labels = {"num_labels": job["classes"]} if name == "ytuning" else {"num_classes": job["classes"]}
    spec = {"name": name, "at": at, "args": labels | (args or {})}
    return spec | ({"key": key} if key else {})


def _last_blocks(job: dict, n: int) -> str:
    """The site pattern of a ViT's last ``n`` blocks (vit_small / vit_base: 12 unless ``depth`` is set)."""
    depth = job.get("depth") or 12
    return f"blocks.{{{depth - n}..{depth - 1}}}"


#: Our methods on a timm ViT: tuner specs (tuples or dicts, as ``utuning.tune`` takes them).
OURS_VIT: dict[str, Callable[[dict], list]] = {
    "plain": lambda j: [],
    "full": lambda j: [("full_finetune", "**")],
    "linear_probe": lambda j: [_head(j)],
    "adapter": lambda j: [("houlsby_adapter", "blocks.*", {"hidden": 64}), _head(j)],
    "parallel_adapter": lambda j: [("parallel_adapter", "blocks.*.mlp", {"hidden": 64}), _head(j)],
    "dual_u_tuner": lambda j: [("dual_u_tuner", "blocks.*"), _head(j)],
    "tri_u_tuner": lambda j: [("tri_u_tuner", "blocks.*"), _head(j)],
    # PEFT's LoRA on timm's fused qkv: one rank-8 pair for the whole (3D, D) matrix (``fused``).
    "lora": lambda j: [("lora", "blocks.*.attn.qkv", {"rank": 8, "alpha": 8, "fused": True}), _head(j)],
    "lora_merged": lambda j: [("lora", "blocks.*.attn.qkv", {"rank": 8, "alpha": 8, "fused": True}), _head(j)],
    "prefix": lambda j: [("prefix", "blocks.*.attn", {"tokens": 10}), _head(j)],
    "vpt_deep": lambda j: [("vpt_deep", "blocks.*", {"tokens": 10}), _head(j)],
    "bitfit": lambda j: [("bitfit", "blocks.*.*.*"), _head(j)],
    "ssf": lambda j: [("ssf", ["blocks.*.attn.qkv", "blocks.*.mlp.fc1"], {"init_std": 0.0}), _head(j)],
    # PEFT's IA3 setup on timm (``IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"])``).
    "ia3": lambda j: [("ia3", "blocks.*.attn.qkv"), ("ia3", "blocks.*.mlp.fc2", {"feedforward": True}), _head(j)],
    # LoRA at IA3's sites with about IA3's parameter count (rank 1 on qkv and fc2): like IA3's fc2 input
    # vector, a LoRA on fc2 keeps fc2's (B, N, 4D) input for its gradient (benchmarks.peft_methods).
    "lora_ia3_sites": lambda j: [("lora", "blocks.*.attn.qkv", {"rank": 1, "alpha": 1, "fused": True}),
                                 ("lora", "blocks.*.mlp.fc2", {"rank": 1, "alpha": 1}), _head(j)],
    # Against PEFT's DoRA / VeRA / OFT on the same qkv (``benchmarks.peft_methods``; PEFT_VIT below).
    "dora": lambda j: [("dora", "blocks.*.attn.qkv", {"rank": 8, "alpha": 8, "fused": True}), _head(j)],
    "vera": lambda j: [("vera", "blocks.*.attn.qkv", {"rank": 256}), _head(j)],
    "oft": lambda j: [("oft", "blocks.*.attn.qkv", {"block_size": 32, "cayley": "neumann"}), _head(j)],
    "ytuning": lambda j: [_side("ytuning", j)],
    "bypass": lambda j: [_side("bypass", j)],
    # The small-network regime of the Y-tuning paper (<= 2% tunable, benchmarks.side_regime): every block
    # read by a width-32 Y-network, or the last 3 blocks by a width-64 one; the zoo's bypass (bottleneck 10).
    "ytuning_small": lambda j: [_side("ytuning", j, args={"hidden": 32})],
    "ytuning_top": lambda j: [_side("ytuning", j, at=_last_blocks(j, 3), args={"hidden": 64})],
    "bypass_h10": lambda j: [_side("bypass", j, args={"hidden": 10})],
    # The bypass keeping its side chain's activations (no recomputation): the memory/time trade-off.
    "bypass_stored": lambda j: [{**_side("bypass", j), "args": {**_side("bypass", j)["args"], "checkpoint": False}}],
}


def _ours_vit(job: dict) -> Built:
    import utuning
    from utuning.backbones.vit import ViTBackbone

    method = job["method"]
    tasks = int(job.get("tasks", 1))
    if method.startswith("multi_"):  # T side tuners with distinct keys: one backbone pass
        side = method.removeprefix("multi_")
        model = utuning.tune(ViTBackbone(_timm(job)), [_side(side, job, key=f"task{t}") for t in range(tasks)])
    elif method.startswith("separate_"):  # T tuned models: T backbone passes
        side = method.removeprefix("separate_")
        models = [utuning.tune(ViTBackbone(_timm(job)), [_side(side, job)]) for _ in range(tasks)]
        model = _Separate(models)
    else:
        model = utuning.tune(ViTBackbone(_timm(job)), OURS_VIT[method](job))
        if method.endswith("_merged"):
            model.merge()
    trainable = model.trainable_parameters() if hasattr(model, "trainable_parameters") else model.trainable()
    return Built(model, trainable=trainable, total=_count(model))


class _Separate(nn.Module):
    """T independent tuned models answering T tasks (the baseline of one shared pass)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def trainable(self) -> list[nn.Parameter]:
        return [p for m in self.models for p in m.trainable_parameters()]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {f"task{t}": m(x) for t, m in enumerate(self.models)}


def _timm_full(job: dict) -> Built:
    model = _timm(job)
    return Built(model, trainable=list(model.parameters()), total=_count(model))


def _timm_floor(job: dict) -> Built:
    """The floor of any tuner inside the backbone: everything frozen but the patch embedding's bias
    (the first parameter of the network) and the head, so the backward pass runs through every
    layer for the input gradients but computes no weight gradient on the way."""
    model = _timm(job)
    model.requires_grad_(False)
    trainable = [model.patch_embed.proj.bias, *model.head.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    return Built(model, trainable=trainable, total=_count(model))


#: PEFT's configurations of the methods compared with ours (``OURS_VIT`` of the same name without ``peft_``).
PEFT_VIT: dict[str, tuple[str, dict]] = {
    "peft_dora": ("LoraConfig", {"r": 8, "lora_alpha": 8, "use_dora": True}),
    "peft_vera": ("VeraConfig", {"r": 256}),
    "peft_oft": ("OFTConfig", {"r": 0, "oft_block_size": 32, "use_cayley_neumann": True}),
}


def _peft_vit(job: dict) -> Built:
    import peft
    from peft import IA3Config, LoraConfig, get_peft_model

    model = _timm(job)
    if job["method"] in PEFT_VIT:
        cls, kwargs = PEFT_VIT[job["method"]]
        config = getattr(peft, cls)(target_modules=["qkv"], modules_to_save=["head"], **kwargs)
    elif job["method"].startswith("peft_lora"):
        config = LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"])
    else:
        config = IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"], modules_to_save=["head"])
    model = get_peft_model(model, config)
    if job["method"].endswith("_merged"):
        model = model.merge_and_unload()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Built(model, trainable=trainable, total=_count(model))


VIT_METHODS: dict[str, Callable[[dict], Built]] = {
    "full_timm": _timm_full, "plain_timm": _timm_full, "floor_timm": _timm_floor,
    **{name: _ours_vit for name in OURS_VIT},
    "peft_lora": _peft_vit, "peft_lora_merged": _peft_vit, "peft_ia3": _peft_vit, **dict.fromkeys(PEFT_VIT, _peft_vit),
    "multi_bypass": _ours_vit, "separate_bypass": _ours_vit, "multi_ytuning": _ours_vit, "separate_ytuning": _ours_vit,
}


# Text (BERT-base shape, random weights) -----------------------------------------------------
def _bert(job: dict) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    kwargs = {"num_labels": job["classes"]}
    if job.get("depth"):
        kwargs["num_hidden_layers"] = job["depth"]
    if job.get("hidden"):
        kwargs.update(hidden_size=job["hidden"], num_attention_heads=job["hidden"] // 64,
                      intermediate_size=4 * job["hidden"])
    return BertForSequenceClassification(BertConfig(**kwargs))


def _text_inputs(job: dict) -> dict[str, Tensor]:
    b, n = job["batch"], job["seq"]
    return {"input_ids": torch.randint(1000, 20000, (b, n)), "attention_mask": torch.ones(b, n, dtype=torch.long),
            "token_type_ids": torch.zeros(b, n, dtype=torch.long)}


def _hf_full(job: dict) -> Built:
    model = _bert(job)
    return Built(model, trainable=list(model.parameters()), total=_count(model))


def _peft_text(job: dict) -> Built:
    import peft
    import transformers
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    cls = PrefixTuningConfig if job["method"] == "peft_prefix" else PromptTuningConfig
    try:
        model = get_peft_model(_bert(job), cls(task_type="SEQ_CLS", num_virtual_tokens=10))
        with torch.no_grad():
            model(**{k: v[:1, :8] for k, v in _text_inputs(job).items()})
    except (ValueError, TypeError, AttributeError) as err:
        raise Unavailable(f"PEFT {peft.__version__} cannot run {cls.__name__} on transformers "
                          f"{transformers.__version__}: {err}") from None
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Built(model, trainable=trainable, total=_count(model))


#: Ours on the same BERT: prefix tuning in every layer, and prompt tuning at the input (Lester et al.).
OURS_TEXT = {
    "prefix": lambda j: [("prefix", "blocks.*.attn", {"tokens": 10}), _head(j)],
    "prompt": lambda j: [("prompt", "embed", {"tokens": 10, "init": "normal"}), _head(j)],
}


def _ours_text(job: dict) -> Built:
    import utuning
    from utuning.errors import UtuningError

    bert = _bert(job)
    try:
        backbone = utuning.wrap(bert)
    except UtuningError as first:
        if "hf_text" not in utuning.BACKBONES:
            raise Pending("the text backbone (backbones/hf_text.py) is not registered yet") from first
        with tempfile.TemporaryDirectory() as folder:
            bert.save_pretrained(folder)
            try:
                backbone = utuning.build_backbone("hf_text", model=folder, pretrained=folder,
                                                  num_classes=job["classes"])
            except (UtuningError, TypeError, OSError, ValueError) as err:
                raise Pending(f"the text backbone does not build a BERT-base model here: {err}") from err
    try:
        model = utuning.tune(backbone, OURS_TEXT[job["method"]](job))
    except UtuningError as err:
        raise Pending(f"{job['method']} does not attach to the text backbone: {err}") from err
    return Built(model, trainable=model.trainable_parameters(), total=_count(model))


TEXT_METHODS: dict[str, Callable[[dict], Built]] = {
    "full_hf": _hf_full, "peft_prefix": _peft_text, "peft_prompt": _peft_text,
    "prefix": _ours_text, "prompt": _ours_text,
}


def build(job: dict) -> Built:
    """The model, one step's inputs and the trainable parameters of ``job``."""
    methods = VIT_METHODS if job["family"] == "vit" else TEXT_METHODS
    if job["family"] == "arch":  # Swin, EVA-02, BEiT, ConvNeXt (benchmarks.families)
        from benchmarks.families import ARCH_METHODS as methods
    built = methods[job["method"]](job)
    if job["family"] in ("vit", "arch"):
        built.args = (torch.randn(job["batch"], 3, job["img"], job["img"]),)
    else:
        built.kwargs = _text_inputs(job)
    built.labels = torch.randint(0, job["classes"], (job["batch"],))
    for p in built.model.parameters():
        p.requires_grad_(False)
    for p in built.trainable:
        p.requires_grad_(True)
    return built
