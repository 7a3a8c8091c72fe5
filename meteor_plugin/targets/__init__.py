"""Adapters: what to patch in each upstream codebase, one module each."""

from .eagle import TARGET as EAGLE
from .llava import TARGET as LLAVA

ALL = (LLAVA, EAGLE)
BY_NAME = {t.name: t for t in ALL}
