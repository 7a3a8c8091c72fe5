"""python -m meteor_plugin.run [--meteor-config PATH] MODULE [ARGS...]

Runs MODULE as ``__main__`` (as ``python -m MODULE ARGS...`` would) with the plugin enabled: with the
given config, else METEOR_CONFIG, else each checkpoint's saved config or the defaults. Running as
``__main__`` matters: LLaVA's ``model_vqa_loader`` reads a module-global ``args`` set only there.
"""

from __future__ import annotations

import runpy
import sys
from typing import List, Optional

USAGE = "usage: python -m meteor_plugin.run [--meteor-config PATH] MODULE [ARGS...]"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = None
    if argv[:1] == ["--meteor-config"]:
        if len(argv) < 2:
            raise SystemExit(USAGE)
        config, argv = argv[1], argv[2:]
    elif argv and argv[0].startswith("--meteor-config="):
        config, argv = argv[0].split("=", 1)[1], argv[1:]
    if not argv or argv[0].startswith("-"):
        raise SystemExit(USAGE)
    import meteor_plugin

    if config is not None:
        meteor_plugin.enable(config)
    elif not meteor_plugin.is_enabled():
        meteor_plugin.enable()
    module = argv[0]
    sys.argv = [module] + argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
