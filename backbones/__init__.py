"""Backbone adapters (installed as ``utuning.backbones``). Importing registers them."""

from utuning.backbones import vit  # noqa: F401
