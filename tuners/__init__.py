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
from utuning.tuners import dora, ln_tuning, loha, lokr, oft  # noqa: F401,E402
from utuning.tuners import adapter_plus, difffit, fact, glora, llama_adapter, loreft, lst, rep_adapter, vera  # noqa: F401,E402,E501
from utuning.tuners import conv_lora  # noqa: F401, E402  (LoRA for convolutions)
from utuning.tuners import convpass  # noqa: F401, E402  (Convpass)
