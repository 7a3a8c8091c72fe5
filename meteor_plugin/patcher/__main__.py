"""python -m meteor_plugin.patcher apply|check|revert PATH [--dry-run] (same as ``meteor-plugin patch``)."""

import sys

from .cli import run

sys.exit(run())
