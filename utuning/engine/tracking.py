"""Experiment tracking through 🤗 accelerate's trackers (``output.trackers``): TensorBoard, MLflow,
Weights & Biases, Aim, Comet, ClearML, DVCLive — whatever accelerate supports, by its name.

The run's metrics (the same records as ``metrics.jsonl``) and its flattened recipe (as
hyperparameters) go to every tracker. ``output.tracker_args`` passes each tracker's own init
arguments (``{mlflow: {run_name: ...}}``). Trackers that need a location get a local default so
nothing is sent anywhere unless asked: MLflow records into a local store, the SQLite file
``./mlflow.db`` (MLflow 3 retired its plain-folder store), unless ``MLFLOW_TRACKING_URI`` or
``output.tracking_uri`` says otherwise (a server, PostgreSQL, ...). ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows the runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from utuning.errors import ConfigError, closest

# Environment defaults per tracker (data, not code): applied only when the variable is unset.
LOCAL_DEFAULTS = {"mlflow": {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}}
URI_VARIABLE = {"mlflow": "MLFLOW_TRACKING_URI"}


def known_trackers() -> list[str]:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check(trackers: list[str]) -> None:
    known = known_trackers()
    for name in trackers:
        if name not in known:
            raise ConfigError(f"output.trackers: unknown tracker {name!r}. Did you mean {closest(name, known)}? "
                              f"Known (accelerate): {known}")


def prepare_environment(trackers: list[str], tracking_uri: str | None) -> None:
    """Point each tracker at ``tracking_uri`` (or its local default) before accelerate starts it."""
    for name in trackers:
        if tracking_uri is not None and name in URI_VARIABLE:
            os.environ[URI_VARIABLE[name]] = tracking_uri
        for key, value in LOCAL_DEFAULTS.get(name, {}).items():
            os.environ.setdefault(key, value)


def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as ``{"optim.lr": 0.01, ...}`` with scalar values (what trackers store)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat(value, full + "."))
        else:
            out[full] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out
