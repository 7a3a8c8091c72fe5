"""Adapters: what to patch in each upstream codebase, one module each."""

from .eagle import TARGET as EAGLE
from .hf_llava import TARGET as TRANSFORMERS_LLAVA
from .llava import TARGET as LLAVA

ALL = (LLAVA, EAGLE, TRANSFORMERS_LLAVA)
BY_NAME = {t.name: t for t in ALL}
