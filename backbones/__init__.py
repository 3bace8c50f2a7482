"""Backbone adapters (installed as ``utuning.backbones``). Importing registers them."""

from utuning.backbones import (
    hf_text,  # noqa: F401
    vit,  # noqa: F401
)
