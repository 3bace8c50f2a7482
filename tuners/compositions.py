"""Named mixes of tuners. Dual-/Tri-U-Tuner are compositions of the parallel tuners, not new
classes (U-Tuning, arXiv 2303.00690, Sec. 3.4): one tuner on MHA and one on FFN (Dual), plus
one on the whole block (Tri)."""

from __future__ import annotations

from typing import Any

from utuning.errors import ConfigError
from utuning.registry import register_composition
from utuning.tuner import TunerSpec

BLOCKS = "blocks.*"


def _layers(at: str | list[str]) -> str:
    """The block pattern a composition spans: ``blocks.*`` or e.g. ``blocks.{0..3}``."""
    at = at if isinstance(at, str) else at[0]
    if at.startswith(("blocks", "stages")):  # stages.{s}: a hierarchical backbone's stage selector
        return at
    if at in ("*", "**"):
        return BLOCKS
    raise ConfigError(f"A composition spans whole blocks: at={at!r} selects no blocks; give e.g. 'blocks.*', "
                      "'blocks.{0..3}' or (hierarchical backbones) 'stages.1'")


@register_composition("dual_u_tuner")
def dual_u_tuner(at: str | list[str] = BLOCKS, tuner: str = "p_adapter", **args: Any) -> list[TunerSpec]:
    """A parallel tuner on every MHA and every FFN operation of the chosen blocks."""
    b = _layers(at)
    return [TunerSpec(tuner, [f"{b}.attn", f"{b}.mlp"], args)]


@register_composition("tri_u_tuner")
def tri_u_tuner(at: str | list[str] = BLOCKS, tuner: str = "p_adapter", **args: Any) -> list[TunerSpec]:
    """Dual-U-Tuner plus a parallel tuner on each whole block."""
    b = _layers(at)
    return [TunerSpec(tuner, [f"{b}.attn", f"{b}.mlp", b], args)]


@register_composition("houlsby_adapter")
def houlsby_adapter(at: str | list[str] = BLOCKS, **args: Any) -> list[TunerSpec]:
    """Sequential adapters after MHA and FFN (Houlsby et al. 2019)."""
    b = _layers(at)
    return [TunerSpec("adapter", [f"{b}.attn", f"{b}.mlp"], args)]


@register_composition("pfeiffer_adapter")
def pfeiffer_adapter(at: str | list[str] = BLOCKS, **args: Any) -> list[TunerSpec]:
    """A sequential adapter after FFN only (Pfeiffer et al. 2021)."""
    return [TunerSpec("adapter", f"{_layers(at)}.mlp", args)]


@register_composition("vpt_deep")
def vpt_deep(at: str | list[str] = BLOCKS, **args: Any) -> list[TunerSpec]:
    """New prompt tokens before every block (Jia et al. 2022)."""
    return [TunerSpec("prompt", _layers(at), args)]


@register_composition("vpt_shallow")
def vpt_shallow(at: str | list[str] = "embed", **args: Any) -> list[TunerSpec]:
    """Prompt tokens inserted once, before the first block, kept to the end."""
    return [TunerSpec("prompt", "embed", args)]


@register_composition("full_finetune")
def full_finetune(at: str | list[str] = "**", **args: Any) -> list[TunerSpec]:
    """Every parameter of the model trains (the full fine-tuning baseline)."""
    return [TunerSpec("full", ["embed", BLOCKS, "norm", "head"], args)]
