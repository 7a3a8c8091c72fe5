"""meteor-plugin: METEOR's three-stage visual-token pruning for LLaVA and EAGLE.

    import meteor_plugin
    meteor_plugin.enable(meteor_plugin.MeteorConfig(llm_layer=2, llm_max_keep=0.25))   # every model, every thread
    with meteor_plugin.enabled(config): ...        # this block (this thread); with meteor_plugin.disabled(): ...
    meteor_plugin.attach(model, config)            # this model only, until meteor_plugin.detach(model)

Importing patches nothing, unless METEOR_CONFIG names a config file: then the import enables it, which
is how unmodified scripts are driven.
"""

from .adapters.refusal import UnsupportedModelError
from .config import MeteorConfig
from .patching import Attachment, attach, detach, disable, disabled, enable, enable_from_env, enabled, is_enabled
from .stats import RunStats, stats

__version__ = "0.1.0"
__all__ = ["MeteorConfig", "enable", "disable", "is_enabled", "enabled", "disabled", "attach", "detach",
           "Attachment", "stats", "RunStats", "UnsupportedModelError", "__version__"]

enable_from_env()
