"""Operation handles: what a backbone lets tuners do with the frozen operation of a site.

A handle is a plain object (not an ``nn.Module``) holding references to frozen submodules, so
attaching tuners never re-registers or renames frozen parameters. Backbone adapters subclass
``OpHandle`` and fill in what their sites offer; the site's ``SiteSpec.features`` lists it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor, nn

from utuning.errors import PlacementError


class OpHandle:
    """Access to one site's frozen operation.

    ``modules`` maps names (stable, used in state-dict keys of ``unfreeze`` tuners) to the frozen
    modules or parameters the operation consists of.
    """

    def __init__(self, site: str, modules: Mapping[str, nn.Module | nn.Parameter] | None = None) -> None:
        self.site = site
        self.modules = dict(modules or {})

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, mod in self.modules.items():
            if isinstance(mod, nn.Parameter):
                yield name, mod
            elif mod is not None:
                for sub, p in mod.named_parameters():
                    yield f"{name}.{sub}", p

    def query(self, x: Tensor) -> Tensor:
        """Frozen query projection of the operation's input: (B, N, D) -> (B, H, N, Dh)."""
        raise PlacementError(f"Site {self.site!r} offers no frozen query projection")

    def key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen key/value projections of tokens entering the attention: -> two (B, H, P, Dh)."""
        raise PlacementError(f"Site {self.site!r} offers no frozen key/value projections")

    def rotary_query(self, x: Tensor) -> Tensor:
        """``query`` rotated as the block's own queries are at the current call's positions, where the
        rotary angles change from call to call (decoders): (B, N, D) -> (B, H, N, Dh) — feature
        ``rotary_query``. Sites without it have no such positions (or ``query`` already carries them)."""
        raise PlacementError(f"Site {self.site!r} offers no rotary query (handle entry 'rotary_query')")

    def raw_key_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen key/value projections of tokens placed directly in the attention's input, skipping
        the operation's pre-norm: -> two (B, H, P, Dh) — feature ``raw_key_value``."""
        raise PlacementError(f"Site {self.site!r} offers no key/value projections without its pre-norm "
                             "(handle entry 'raw_key_value')")

    def out_proj(self, heads: Tensor) -> Tensor:
        """The linear part of the frozen map from an attention's merged heads to the operation's
        output (W_o without its bias): (B, N, H*Dh) -> (B, N, D), so ``OP(x) + out_proj(u)`` adds
        ``u`` to the heads before W_o — feature ``out_proj``."""
        raise PlacementError(f"Site {self.site!r} offers no frozen output projection (handle entry 'out_proj')")

    @property
    def linear(self) -> nn.Linear:
        """The frozen linear layer of a linear site."""
        raise PlacementError(f"Site {self.site!r} is not a linear site")


class LinearHandle(OpHandle):
    """Handle of a linear site: the frozen ``nn.Linear`` itself."""

    def __init__(self, site: str, layer: nn.Linear) -> None:
        super().__init__(site, {"": layer})
        self._layer = layer

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self._layer.named_parameters()

    @property
    def linear(self) -> nn.Linear:
        return self._layer
