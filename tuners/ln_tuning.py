"""LN tuning: train only the LayerNorm parameters inside a frozen operation."""

from __future__ import annotations

from torch import nn

from utuning.errors import PlacementError
from utuning.handle import OpHandle
from utuning.registry import register_tuner
from utuning.sites import SiteSpec
from utuning.tuner import Tuner

NORMS = (nn.LayerNorm, nn.RMSNorm)


def norm_parameters(op: OpHandle) -> dict[str, nn.Parameter]:
    """The affine parameters of every LayerNorm / RMSNorm among the operation's frozen modules,
    by stable name (``norm1.weight``, ``attention.output.LayerNorm.bias``...)."""
    found: dict[str, nn.Parameter] = {}
    for name, module in op.modules.items():
        if not isinstance(module, nn.Module):
            continue
        for sub, child in module.named_modules():
            # Libraries' own norm classes too (Hugging Face's LlamaRMSNorm, Qwen3RMSNorm, T5LayerNorm...).
            if isinstance(child, NORMS) or type(child).__name__.endswith(("RMSNorm", "LayerNorm")):
                prefix = ".".join(p for p in (name, sub) if p)
                for pname, p in child.named_parameters(recurse=False):
                    found[f"{prefix}.{pname}"] = p
    return found


@register_tuner("ln_tuning")
class LNTuning(Tuner):
    """LN tuning (Qi et al. 2022, arXiv 2211.08682; Zhao et al. 2023, arXiv 2312.11420): train the
    gain and bias of the LayerNorms of the operation (ViT ``blocks.{i}.attn``: ``norm1``; ``.mlp``:
    ``norm2``; ``norm``: the final norm; text encoders: each sub-layer's post-LayerNorm, and
    ``embed``'s). Placement ``unfreeze``: the frozen LayerNorms themselves train, so the tuner is
    the identity at init, needs no merge, and its state dict holds those parameters under stable
    names. A site whose operation has no LayerNorm is refused when the tuner is attached.
    """

    placement = "unfreeze"
    site_kinds = frozenset({"embed", "block", "attn", "mlp", "norm"})
    paper = "https://arxiv.org/abs/2211.08682"

    def __init__(self, site: SiteSpec) -> None:
        super().__init__(site)

    @classmethod
    def check_handle(cls, op: OpHandle) -> None:
        if not norm_parameters(op):
            raise PlacementError(f"ln_tuning at {op.site!r}: the operation has no LayerNorm to train "
                                 f"(its modules: {sorted(op.modules)})")

    def trainable(self, op: OpHandle) -> dict[str, nn.Parameter]:
        return norm_parameters(op)
