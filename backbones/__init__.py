"""Backbone adapters (installed as ``utuning.backbones``). Importing registers them.

timm: ``vit`` (VisionTransformer), ``eva`` (EVA-02, RoPE ViTs), ``beit``, ``swin`` (Swin v1),
``convnext``; Hugging Face: ``hf_text`` (BERT/RoBERTa/ELECTRA/DeBERTa-v2), ``hf_vision`` (ViT,
DINOv2, CLIP and SigLIP vision encoders), ``hf_decoder`` (Llama family, GPT-2); PyTorch:
``torch_mha`` (nn.MultiheadAttention models), ``generic`` (any nn.Module; the fallback of ``wrap``).
"""

from utuning.backbones import (  # noqa: F401
    beit,
    convnext,
    eva,
    generic,
    hf_decoder,
    hf_text,
    hf_vision,
    swin,
    torch_mha,
    vit,
)
