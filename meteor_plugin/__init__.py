"""meteor-plugin: METEOR's three-stage visual-token pruning for LLaVA and EAGLE.

    import meteor_plugin
    meteor_plugin.enable(meteor_plugin.MeteorConfig(llm_layer=2, llm_max_keep=0.25))

Importing patches nothing, unless METEOR_CONFIG names a config file: then the import enables it, which
is how unmodified scripts are driven.
"""

from .config import MeteorConfig
from .patching import disable, enable, enable_from_env, is_enabled
from .runtime import attach
from .stats import RunStats, stats
from .adapters.refusal import UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["MeteorConfig", "enable", "disable", "is_enabled", "stats", "attach", "RunStats", "UnsupportedModelError",
           "__version__"]

enable_from_env()
