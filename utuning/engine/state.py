"""Run state: RNG states (stored without pickle, see ``utuning.files.save_tree``) and which metric is better."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# Metrics where lower is better (the best checkpoint minimises them); every other metric is maximised.
LOWER_IS_BETTER = frozenset({"loss", "mse", "mae", "rmse", "perplexity"})


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` beats ``old`` on ``metric``; a non-finite value never does."""
    if not math.isfinite(new):
        return False
    if old is None or not math.isfinite(old):
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old
