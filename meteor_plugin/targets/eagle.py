"""EAGLE (NVlabs/EAGLE at fef95f1, not on PyPI): the classes to wrap.

PyPI's ``eagle`` is an unrelated GUI library, so EAGLE is recognised by its model file, not its name.
"""

from .common import FamilyTarget
from .eagle_vision import patch_eagle_vision

TARGET = FamilyTarget(
    name="eagle",
    module="eagle.model.language_model.eagle_llama",
    causal="EagleLlamaForCausalLM",
    llm="EagleLlamaModel",
    vision=(patch_eagle_vision,),
)
