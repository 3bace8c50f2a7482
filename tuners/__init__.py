"""The tuner zoo (installed as ``utuning.tuners``). Importing registers every tuner."""

from utuning.tuners import (  # noqa: F401
    adapter,
    baselines,
    bias_scale,
    bypass,
    compositions,
    lora,
    prefix,
    prompt,
    u_tuning,
    ytuning,
)
