"""utuning: parameter-efficient transfer learning as frozen operations plus unified tuners.

    x' = OP(x) + U(x)        (U-Tuning, arXiv 2303.00690; Res-Tuning, arXiv 2310.19859)
"""

# Registration of the bundled tuners and backbones (no other import-time side effects).
from utuning import backbones as backbones  # noqa: E402
from utuning import tuners as tuners  # noqa: E402
from utuning.attention import attend
from utuning.backbone import Backbone, Features, build_backbone, wrap
from utuning.errors import (
    CacheError,
    ConfigError,
    PlacementError,
    SiteError,
    StateDictError,
    UnknownNameError,
    UnsupportedModelError,
    UtuningError,
)
from utuning.generate import generate  # noqa: E402  (the function; the module stays importable as utuning.generate)
from utuning.handle import LinearHandle, OpHandle
from utuning.model import TunedModel, expand_specs, tune, unwrap
from utuning.pretrained import from_pretrained, save_pretrained
from utuning.registry import (
    BACKBONES,
    COMPOSITIONS,
    TUNERS,
    Registry,
    register_backbone,
    register_composition,
    register_tuner,
)
from utuning.sites import SiteSpec, match_sites
from utuning.slot import Slot
from utuning.tuner import PLACEMENTS, SideTuner, Tuner, TunerSpec

__version__ = "0.1.0"

__all__ = [
    "BACKBONES", "COMPOSITIONS", "PLACEMENTS", "TUNERS", "Backbone", "CacheError", "ConfigError", "Features",
    "LinearHandle", "OpHandle", "PlacementError", "Registry", "SideTuner", "SiteError", "SiteSpec", "Slot",
    "StateDictError", "TunedModel", "Tuner", "TunerSpec", "UnknownNameError", "UnsupportedModelError",
    "UtuningError", "attend", "build_backbone", "expand_specs", "from_pretrained", "generate", "match_sites",
    "register_backbone", "register_composition", "register_tuner", "save_pretrained", "tune", "unwrap", "wrap",
]
