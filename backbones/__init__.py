"""Backbone adapters (installed as ``utuning.backbones``). Importing registers them."""

from utuning.backbones import (
    hf_decoder,  # noqa: F401
    hf_text,  # noqa: F401
    vit,  # noqa: F401
)
from utuning.backbones import generic, torch_mha  # noqa: F401, E402  (any nn.Module; nn.MultiheadAttention)

from utuning.backbones import beit, eva  # noqa: F401, E402  (timm BEiT, EVA-02 / RoPE ViTs)
from utuning.backbones import convnext, swin  # noqa: F401, E402  (timm Swin v1, ConvNeXt)
from utuning.backbones import hf_vision  # noqa: F401, E402  (HF ViT, DINOv2, CLIP and SigLIP vision encoders)
