"""An exponential moving average of the tuner weights."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from utuning.errors import ConfigError
from utuning.model import TunedModel


class TunerEMA:
    """Exponential moving average of the tuner parameters only (the frozen backbone is shared):
    ``shadow = decay * shadow + (1 - decay) * param`` after every update."""

    def __init__(self, model: TunedModel, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema must lie in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, _ in model.named_trainable_parameters()]
        self.shadow = [p.detach().clone().float() for p in model.trainable_parameters()]

    @torch.no_grad()
    def update(self, model: TunedModel) -> None:
        for s, p in zip(self.shadow, model.trainable_parameters()):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self, model: TunedModel) -> Iterator[None]:
        """Swap the EMA weights in (e.g. to evaluate or save), restore the raw ones afterwards."""
        params = model.trainable_parameters()
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(params, raw):
                    p.copy_(r)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": dict(zip(self.names, (s.cpu() for s in self.shadow)))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][name])


